//! flashgate-agent (being written).
