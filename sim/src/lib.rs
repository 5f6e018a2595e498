//! flashgate-sim (being written).
