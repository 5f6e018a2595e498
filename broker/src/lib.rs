//! flashgate-broker (being written).
