//! VMMS: placeholder until the vmm-core issue lands.
