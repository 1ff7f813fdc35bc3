"""Both legs of the data plane in-process, with fake transports, state by state (uvicorn's
tests/protocols style): no sockets, no sleeps; a test plays the client and the target by calling
the protocols' callbacks and asserts on the bytes written and on phases and pool counts."""
