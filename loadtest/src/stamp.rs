//! The send-time stamp a publisher puts into a message's `data`, and how a receiver finds it.
//!
//! Publisher and receivers are different processes, so the stamp is read from `CLOCK_MONOTONIC`, one
//! clock for every process on the machine (unlike `Instant`, which cannot cross a process boundary, and
//! unlike wall time, which may be stepped). It is written as `"lt_ns":<nanoseconds>` inside `data`, and
//! receivers look for that key anywhere in a frame's payload, so it works the same in a `message` event
//! of a client publish and in a stored notification's object, and against any server that passes `data`
//! through.
//!
//! Open-loop publishers stamp the time a message was *due*, not the time it was written, so a stalled
//! publisher or server shows up as latency (no coordinated omission).

/// The key of the stamp inside `data`.
pub const STAMP_KEY: &[u8] = b"\"lt_ns\":";

/// Nanoseconds on `CLOCK_MONOTONIC`, comparable between processes on this machine.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill in; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Appends `{"lt_ns":<ns>}`, a `data` object holding the stamp.
pub fn write_stamp_object(out: &mut Vec<u8>, ns: u64) {
    out.push(b'{');
    out.extend_from_slice(STAMP_KEY);
    write_u64(out, ns);
    out.push(b'}');
}

/// Appends the decimal digits of `n` without going through `fmt`.
pub fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The stamp in a payload, if it carries one: `"lt_ns":N` as written, or `\"lt_ns\":N` when `data`
/// travels as an escaped JSON string (the Pusher protocol's events).
pub fn find_stamp(payload: &[u8]) -> Option<u64> {
    let name = &STAMP_KEY[1..STAMP_KEY.len() - 2];
    let after_name = memchr::memmem::find(payload, name)? + name.len();
    let rest = &payload[after_name..];
    let at = after_name
        + [&b"\":"[..], b"\\\":"]
            .iter()
            .find(|close| rest.starts_with(close))?
            .len();
    let digits = &payload[at..];
    let mut value: u64 = 0;
    let mut seen = 0;
    for &b in digits.iter().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        seen += 1;
    }
    (seen > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_stamp_is_found_again() {
        let mut data = Vec::new();
        write_stamp_object(&mut data, 1_234_567_890_123);
        assert_eq!(data, br#"{"lt_ns":1234567890123}"#);
        let frame = [
            br#"{"event":"message","channel":"c","from":"p","data":"#.as_slice(),
            &data,
            b"}",
        ]
        .concat();
        assert_eq!(find_stamp(&frame), Some(1_234_567_890_123));
        let escaped = br#"{"event":"lt","channel":"c","data":"{\"lt_ns\":77}"}"#;
        assert_eq!(find_stamp(escaped), Some(77));
    }

    #[test]
    fn frames_without_a_stamp_have_none() {
        assert_eq!(
            find_stamp(br#"{"event":"subscribed","channels":["a"]}"#),
            None
        );
        assert_eq!(find_stamp(br#"{"lt_ns":"x"}"#), None);
        assert_eq!(find_stamp(b"\"lt_ns\":"), None);
    }

    #[test]
    fn zero_and_the_largest_value_are_written_as_digits() {
        let mut out = Vec::new();
        write_u64(&mut out, 0);
        out.push(b' ');
        write_u64(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a && a > 0);
    }
}
