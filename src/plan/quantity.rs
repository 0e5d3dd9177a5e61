//! Storage sizes: parse Kubernetes quantities (`10Gi`, `500M`, `1.5Ti`, `1e9`) to bytes, so
//! disk sizes can be compared with image capacities.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Binary suffixes first: `Mi` must not be read as `M`.
const SUFFIXES: &[(&str, u128)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// [`bytes`] as a `u64` for sizes handed to a Pod: 0 for an invalid quantity, saturating above
/// `u64::MAX`.
pub fn bytes_u64(q: &Quantity) -> u64 {
    bytes(q).unwrap_or(0).min(u128::from(u64::MAX)) as u64
}

/// The number of bytes a quantity stands for (rounded up), or `None` if it is not a valid
/// non-negative quantity.
pub fn bytes(q: &Quantity) -> Option<u128> {
    let s = q.0.trim();
    let suffix = SUFFIXES.iter().find_map(|(suffix, m)| Some((s.strip_suffix(suffix)?, *m)));
    let (number, multiplier) = match suffix {
        Some(found) => found,
        None => match s.split_once(['e', 'E']) {
            Some((mantissa, exp)) => (mantissa, 10u128.checked_pow(exp.parse().ok()?)?),
            None => (s, 1),
        },
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut total = whole.checked_mul(multiplier)?;
    if !fraction.is_empty() {
        let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
        let frac: u128 = fraction.parse().ok()?;
        total = total.checked_add((frac * multiplier).div_ceil(scale))?;
    }
    Some(total)
}

/// The larger of two quantities (the first when they are equal or one does not parse).
pub fn max(a: &Quantity, b: &Quantity) -> Quantity {
    match (bytes(a), bytes(b)) {
        (Some(x), Some(y)) if y > x => b.clone(),
        _ => a.clone(),
    }
}

/// The smaller of two quantities (the first when they are equal or one does not parse).
pub fn min(a: &Quantity, b: &Quantity) -> Quantity {
    match (bytes(a), bytes(b)) {
        (Some(x), Some(y)) if y < x => b.clone(),
        _ => a.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.to_owned())
    }

    #[test]
    fn parses_binary_decimal_and_plain_sizes() {
        assert_eq!(bytes(&q("1Gi")), Some(1 << 30));
        assert_eq!(bytes(&q("10G")), Some(10_000_000_000));
        assert_eq!(bytes(&q("1.5Gi")), Some(3 << 29));
        assert_eq!(bytes(&q("512")), Some(512));
        assert_eq!(bytes(&q("1e3")), Some(1000));
        assert_eq!(bytes(&q("0.5")), Some(1), "rounded up");
        assert_eq!(bytes(&q("-1Gi")), None);
        assert_eq!(bytes(&q("Gi")), None);
        assert_eq!(bytes(&q("ten")), None);
    }

    #[test]
    fn max_compares_across_units() {
        assert_eq!(max(&q("1Gi"), &q("2000Mi")).0, "2000Mi");
        assert_eq!(max(&q("2Gi"), &q("2000Mi")).0, "2Gi");
        assert_eq!(max(&q("1G"), &q("1000M")).0, "1G");
    }
}
