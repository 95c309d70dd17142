"""The edge: holds Phoenix client connections and forwards their messages over the bus."""
