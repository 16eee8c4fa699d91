//! Simulated devices for machines with no USB hardware. Placeholder: the simulated
//! mass-storage disk lands here.
