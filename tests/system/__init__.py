"""System tests: daemons, CLIs as subprocesses, the broker, emulators, network namespaces."""
