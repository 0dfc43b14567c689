//! Test harness for whole-VM tests.
