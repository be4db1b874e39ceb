//! RFC 3339 timestamps without a date-time crate: access logs need only UTC and milliseconds.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC). Times before 1970 are written as the epoch.
pub(crate) fn write_rfc3339_millis(t: SystemTime, out: &mut String) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), by 400-year eras.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a "year".
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fmt(secs: u64, millis: u64) -> String {
        let mut out = String::new();
        write_rfc3339_millis(
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis),
            &mut out,
        );
        out
    }

    #[test]
    fn known_instants() {
        assert_eq!(fmt(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(fmt(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(fmt(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
        let mut out = String::new();
        write_rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5), &mut out);
        assert_eq!(out, "1970-01-01T00:00:00.000Z");
    }
}
