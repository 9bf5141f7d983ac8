//! Shared checks for the fuzz targets; the code under test is the `upsync_core` crate
//! (the module's pure logic), linked as a normal dependency.

pub mod check;
