"""The protocol-neutral data plane: the edge process, the AEAD engine shared with workers, the host-shared session table and replay windows, and the kernel's TUN, UDP and BPF."""
