//! eBPF probes that time every URB inside the client kernel. Placeholder until the telemetry
//! issue lands: the probes are C, built by `cargo xtask build-ebpf`, loaded by aya.
