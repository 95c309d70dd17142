// zchannels-recovery.js: message recovery for the unmodified phoenix.js client.
//
// Every edge serves this file at /js/zchannels-recovery.js. On a topic that keeps history, each
// broadcast carries its position "<epoch>:<offset>" in the frame's ref slot (phoenix.js hands it
// to channel.on callbacks as their second argument), and every join is answered by one
// "zc_recovery" event. This helper remembers the last position seen on each channel and names it
// as "zc_since" in the join params of every rejoin (phoenix.js evaluates params on each rejoin
// when they are a function), so the edge replays what the channel missed, in order, exactly once.
//
// Browser:  <script src="/js/phoenix.js"></script>
//           <script src="/js/zchannels-recovery.js"></script>
//           const channel = ZchannelsRecovery.channel(socket, "room:lobby", {user: "ada"})
//           channel.onRecovery(info => { if (info.status === "not_recovered") reloadState() })
// Node:     const ZchannelsRecovery = require("./zchannels-recovery.js")
//
// ZchannelsRecovery.channel(socket, topic, params) -> a phoenix Channel (params: an object or a
//   function, as for socket.channel), with two more methods:
//     channel.onRecovery(callback)  callback(info) on every join's zc_recovery payload:
//       {status: "new" | "recovered" | "not_recovered", position, replayed, reason?}
//       "not_recovered" (reason: "epoch changed", "position too old", ...) means messages were
//       missed that cannot be replayed: reload the state the channel shows.
//     channel.position()            the last position seen ("" before the first).
// ZchannelsRecovery.wrap(socket) makes socket.channel(...) do the same for every channel.
//
// V2 binary broadcasts carry no position (their frame has no ref slot); they are replayed like
// the others, but do not move the position. Works the same over WebSocket and LongPoll.
(function (root, factory) {
  if (typeof module === "object" && module.exports) {
    module.exports = factory();
  } else {
    root.ZchannelsRecovery = factory();
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var POSITION = /^([a-z0-9]+):([0-9]+)$/;
  var RECOVERY_EVENT = "zc_recovery";

  function isPosition(ref) {
    return typeof ref === "string" && POSITION.test(ref);
  }

  function paramsOf(params) {
    if (typeof params === "function") return params;
    return function () { return params || {}; };
  }

  function recoverable(channel) {
    var position = "";
    var callbacks = [];
    var onMessage = channel.onMessage;

    // Every message of this channel passes here before its channel.on callbacks.
    channel.onMessage = function (event, payload, ref, joinRef) {
      if (event === RECOVERY_EVENT && payload && isPosition(payload.position)) {
        // After "recovered", the replayed broadcasts that follow move the position one by one
        // (so a cut during the replay resumes from the last one received); otherwise the
        // channel starts over from the head.
        if (payload.status !== "recovered") position = payload.position;
        for (var i = 0; i < callbacks.length; i++) callbacks[i](payload);
      } else if (isPosition(ref) && event.indexOf("phx_") !== 0) {
        position = ref;
      }
      return onMessage.call(channel, event, payload, ref, joinRef);
    };
    channel.onRecovery = function (callback) {
      callbacks.push(callback);
      return channel;
    };
    channel.position = function () {
      return position;
    };
    return channel;
  }

  function channel(socket, topic, params, channelOf) {
    var userParams = paramsOf(params);
    var made = null;
    var joinParams = function () {
      var out = Object.assign({}, userParams());
      var since = made && made.position();
      if (since) out.zc_since = since;
      return out;
    };
    made = recoverable((channelOf || socket.channel).call(socket, topic, joinParams));
    return made;
  }

  function wrap(socket) {
    var plain = socket.channel;
    socket.channel = function (topic, params) {
      return channel(socket, topic, params, plain);
    };
    return socket;
  }

  return { channel: channel, wrap: wrap, isPosition: isPosition };
});
