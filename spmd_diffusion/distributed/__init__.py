"""How messages move: the RPC protocol, the one worker serve loop, the control planes of
the launchers (MPI, gloo), the shared-memory channel and launcher detection."""
