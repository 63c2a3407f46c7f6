//! Times as the APIs and records show them: RFC 3339 in UTC with milliseconds.

use chrono::{SecondsFormat, TimeZone, Utc};

/// `ms` since the epoch as `2026-12-06T18:32:21.123Z`, or `None` outside the calendar.
pub fn iso_millis(ms: i64) -> Option<String> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_in_utc_and_nothing_outside_the_calendar() {
        assert_eq!(iso_millis(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            iso_millis(1_796_000_000_123).as_deref(),
            Some("2026-11-30T00:53:20.123Z")
        );
        assert_eq!(iso_millis(i64::MAX), None);
        assert_eq!(iso_millis(i64::MIN), None);
    }
}
