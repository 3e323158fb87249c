"""The daemon: the key manager, its gRPC servicers, and the process lifecycle."""
