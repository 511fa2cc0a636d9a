"""The test bed shipped as commands (`fabric demo`, `bench`, `soak`, `cluster`): network namespaces, stock clients, floods, in-memory fakes."""
