"""Handler module that shows what ``connect`` saw: the peer address and scheme from
``connect_info`` go into assigns, and joining any ``info:*`` topic answers with the assigns.

Load it as ``tests/apps/connect_info_app.py`` (attr ``socket``).
"""
from zchannels import Channel, Socket, ok


class InfoChannel(Channel):
    def join(self, topic, payload, socket):
        return ok(dict(socket.assigns))


socket = Socket()
socket.channel("info:*", InfoChannel)


@socket.connect
def connect(params, socket, connect_info):
    return socket.assign(peer=connect_info["peer_data"]["address"],
                         scheme=connect_info["uri"]["scheme"],
                         transport=connect_info["transport"])
