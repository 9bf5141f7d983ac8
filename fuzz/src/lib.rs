//! Shared checks for the fuzz targets; the code under test is the `upsync_core` crate
//! (the module's pure logic), linked as a normal dependency.

pub mod check;

/// The steps of a fuzz input: its pieces between `0xFF 0xFF` separators (an input of
/// several registry answers, written by hand as plain bytes).
pub fn split_steps(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xff && data[i + 1] == 0xff {
            out.push(&data[start..i]);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    out.push(&data[start..]);
    out
}
