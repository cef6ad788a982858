//! `Range` request headers (RFC 9110 §14) for blob reads: a single byte range, resolved
//! against an object's size. Several ranges, or anything else, are left to the upstream.

/// A single `Range: bytes=…` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// `first-[last]`, both inclusive.
    From(u64, Option<u64>),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// `None` for a header this module does not handle (several ranges, another unit,
    /// nonsense): the request may then be answered in full, as RFC 9110 allows.
    pub(crate) fn parse(value: &str) -> Option<ByteRange> {
        let spec = value.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        if first.is_empty() {
            return digits(last).map(ByteRange::Suffix);
        }
        let start = digits(first)?;
        let end = if last.is_empty() {
            None
        } else {
            Some(digits(last)?)
        };
        if end.is_some_and(|e| e < start) {
            return None;
        }
        Some(ByteRange::From(start, end))
    }

    /// `[start, end)` within an object of `size` bytes; `None` when unsatisfiable. A last
    /// byte past the end means "to the end" (RFC 9110 §14.1.2), however large it is.
    pub(crate) fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            _ if size == 0 => None,
            ByteRange::From(start, _) if start >= size => None,
            ByteRange::From(start, end) => {
                Some((start, end.map_or(size, |e| e.saturating_add(1).min(size))))
            }
            ByteRange::Suffix(0) => None,
            ByteRange::Suffix(n) => Some((size.saturating_sub(n), size)),
        }
    }
}

/// A byte position: ASCII digits only (`u64::from_str` would take a `+` too).
fn digits(s: &str) -> Option<u64> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(v: &str, size: u64) -> Option<(u64, u64)> {
        ByteRange::parse(v).and_then(|r| r.resolve(size))
    }

    #[test]
    fn ranges_resolve_within_the_object() {
        assert_eq!(resolved("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(resolved("bytes=90-", 100), Some((90, 100)));
        assert_eq!(resolved("bytes=90-1000", 100), Some((90, 100)));
        assert_eq!(resolved("bytes=-10", 100), Some((90, 100)));
        assert_eq!(resolved("bytes=-1000", 100), Some((0, 100)));
        assert_eq!(resolved(" bytes= 5 - 5 ", 100), Some((5, 6)));
        assert_eq!(resolved("bytes=99-99", 100), Some((99, 100)));
    }

    #[test]
    fn a_last_byte_past_the_end_means_to_the_end() {
        assert_eq!(
            resolved("bytes=0-18446744073709551615", 100),
            Some((0, 100))
        );
        assert_eq!(
            resolved("bytes=7-18446744073709551614", 100),
            Some((7, 100))
        );
        assert_eq!(resolved("bytes=-18446744073709551615", 100), Some((0, 100)));
    }

    #[test]
    fn unsatisfiable_and_unhandled_ranges() {
        assert_eq!(resolved("bytes=100-", 100), None);
        assert_eq!(resolved("bytes=-0", 100), None);
        assert_eq!(
            resolved("bytes=-5", 0),
            None,
            "nothing to give of an empty blob"
        );
        assert_eq!(resolved("bytes=0-", 0), None);
        for unhandled in [
            "bytes=0-1,5-6",
            "bytes=9-1",
            "items=0-1",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=18446744073709551616-",
            "bytes=+1-2",
        ] {
            assert_eq!(ByteRange::parse(unhandled), None, "{unhandled}");
        }
    }
}
