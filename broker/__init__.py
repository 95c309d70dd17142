"""The central broker: worker registry and routing (ROUTER), broadcast fan-out (XSUB->XPUB)."""
