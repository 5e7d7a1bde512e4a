//! sled 0.34 panics on some damaged data instead of returning an error (at open, e.g.
//! `tried to serialize Uninitialized` in its snapshot code). Every sled call that reads
//! stored data runs through [`catching`], which turns such a panic into a message for a
//! typed [`super::StoreError`], and keeps the default hook from printing a panic trace for
//! it: the operator gets one line naming the data directory and the damage instead.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

thread_local! {
    /// Set while this thread runs a guarded sled call.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic caught on this thread.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Wraps the process's panic hook once: a panic inside a guarded call is kept quiet (it
/// is reported as a store error); any other panic goes to the hook as before.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "sled panicked".to_owned());
                CAUGHT.with(|caught| *caught.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `call`, turning a panic into `Err` with its message.
pub(crate) fn catching<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let was = GUARDED.with(|guarded| guarded.replace(true));
    let result = catch_unwind(AssertUnwindSafe(call));
    GUARDED.with(|guarded| guarded.set(was));
    result.map_err(|_| {
        CAUGHT
            .with(|caught| caught.borrow_mut().take())
            .map_or_else(
                || "sled panicked".to_owned(),
                |m| format!("sled panicked: {}", one_line(&m)),
            )
    })
}

/// sled's panic messages can span lines and dump whole structures: one line, cut short,
/// so a start-up error stays one line a person reads.
fn one_line(message: &str) -> String {
    const MAX_CHARS: usize = 300;
    let flat = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let caught = catching(|| -> u32 { panic!("tried to serialize Uninitialized") });
        assert_eq!(
            caught,
            Err("sled panicked: tried to serialize Uninitialized".to_owned())
        );
        assert_eq!(catching(|| 7), Ok(7));
    }

    #[test]
    fn a_long_message_over_several_lines_becomes_one_short_line() {
        let caught =
            catching(|| -> u32 { panic!("left: 1\n  right: {}", "x".repeat(1000)) }).unwrap_err();
        assert!(!caught.contains('\n'), "{caught}");
        assert!(caught.chars().count() < 340, "{caught}");
    }
}
