//! Checks that a dump file parses (scripts/crash-dump): exits 0 and prints the number of
//! servers, or prints the parse error and exits 1. Uses the module's own dump parser.

use upsync_core::dump;

fn main() {
    let path = std::env::args().nth(1).expect("usage: dumpcheck FILE");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            println!("unreadable: {e}");
            std::process::exit(1);
        }
    };
    match dump::parse(&text) {
        Ok(v) if !v.is_empty() => println!("{}", v.len()),
        Ok(_) => {
            println!("empty");
            std::process::exit(1);
        }
        Err(e) => {
            println!("{e}");
            std::process::exit(1);
        }
    }
}
