//! Money is exact.
//!
//! An amount is an `i64` count of the currency's minor units (cents for USD, yen for JPY,
//! fils for BHD). It is parsed from the exact decimal text of the request — never through a
//! binary float — and printed back with exactly the currency's number of decimals.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

/// Largest accepted amount, in major units (one billion). Anything above is a typo or an attack.
pub const MAX_MAJOR_UNITS: i64 = 1_000_000_000;

/// Every active ISO 4217 alphabetic code with its number of minor-unit digits.
/// Codes not listed in `EXPONENT_0`, `EXPONENT_3` or `EXPONENT_4` have two.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB \
BOV BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP \
DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK \
JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP \
MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD \
RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD \
TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";
const EXPONENT_0: &str = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF";
const EXPONENT_3: &str = "BHD IQD JOD KWD LYD OMR TND";
const EXPONENT_4: &str = "CLF UYW";

/// An ISO 4217 currency with its minor-unit exponent.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CurrencyError {
    #[error("must be an ISO 4217 alphabetic code such as USD")]
    Unknown,
}

impl Currency {
    pub const USD: Currency = Currency {
        code: *b"USD",
        exponent: 2,
    };

    /// Parses an upper-case ISO 4217 code. Lower case is refused rather than guessed.
    pub fn parse(code: &str) -> Result<Self, CurrencyError> {
        let bytes: [u8; 3] = code
            .as_bytes()
            .try_into()
            .map_err(|_| CurrencyError::Unknown)?;
        let slot = table_slot(bytes).ok_or(CurrencyError::Unknown)?;
        match exponents()[slot] {
            UNKNOWN => Err(CurrencyError::Unknown),
            exponent => Ok(Currency {
                code: bytes,
                exponent,
            }),
        }
    }

    pub fn code(&self) -> &str {
        // The bytes were checked to be ASCII upper-case letters in `parse`.
        std::str::from_utf8(&self.code).unwrap_or("XXX")
    }

    /// Number of digits after the decimal point (USD 2, JPY 0, BHD 3).
    pub fn exponent(&self) -> u32 {
        u32::from(self.exponent)
    }
}

/// Marks a three-letter code that is not a currency in [`exponents`].
const UNKNOWN: u8 = u8::MAX;

/// Where the code `AAA`..`ZZZ` sits in [`exponents`]; `None` unless three upper-case letters.
fn table_slot(code: [u8; 3]) -> Option<usize> {
    code.iter().try_fold(0usize, |slot, &b| {
        b.is_ascii_uppercase()
            .then(|| slot * 26 + usize::from(b - b'A'))
    })
}

/// The minor-unit exponent of every three-letter code (`UNKNOWN` if it is no currency),
/// built once from the lists above: parsing a currency is then one lookup, on every request.
fn exponents() -> &'static [u8; 26 * 26 * 26] {
    static TABLE: std::sync::OnceLock<Box<[u8; 26 * 26 * 26]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([UNKNOWN; 26 * 26 * 26]);
        for (list, exponent) in [
            (ISO_4217, 2),
            (EXPONENT_0, 0),
            (EXPONENT_3, 3),
            (EXPONENT_4, 4),
        ] {
            for code in list.split_ascii_whitespace() {
                if let Some(slot) = code.as_bytes().try_into().ok().and_then(table_slot) {
                    table[slot] = exponent;
                }
            }
        }
        table
    })
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An exact amount of one currency.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmountError {
    #[error("must be a decimal number such as 125.50")]
    NotANumber,
    #[error("must be greater than zero")]
    NotPositive,
    #[error("has more decimal places than {currency} allows ({exponent})")]
    TooPrecise { currency: Currency, exponent: u32 },
    #[error("must not exceed {MAX_MAJOR_UNITS}")]
    TooLarge,
}

impl Money {
    /// Parses the exact decimal text of an amount (`"125.50"`, `"1e3"`, `"42"`) for `currency`.
    ///
    /// The text is read digit by digit into its significant digits and a power of ten, so an
    /// amount is never rounded, however many digits or whatever exponent it is written with:
    /// `"0.00000000000000000000000000015e28"` is 1.5, and `"1.0000000000000000000000000000001"`
    /// has too many decimals for any currency.
    pub fn parse(text: &str, currency: Currency) -> Result<Self, AmountError> {
        // At most 64 characters, not counting an exponent's `+`: serde_json writes one into
        // every exponent of a JSON number, and the limit is the same whichever way it came.
        let plus = usize::from(text.contains("e+") || text.contains("E+"));
        if text.len() - plus > 64 || !is_plain_number(text) {
            return Err(AmountError::NotANumber);
        }
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
            Some((mantissa, exponent)) => (mantissa, parse_exponent(exponent)),
            None => (unsigned, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));

        // value = digits × 10^exponent, with no leading or trailing zeros in `digits`.
        let mut digits = [0_u8; 64];
        let mut len = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            if len > 0 || b != b'0' {
                digits[len] = b - b'0';
                len += 1;
            }
        }
        let mut exponent = exponent - fraction.len() as i64;
        while len > 0 && digits[len - 1] == 0 {
            len -= 1;
            exponent += 1;
        }
        let digits = &digits[..len];
        if digits.is_empty() || negative {
            return Err(AmountError::NotPositive);
        }

        // The digits before the decimal point; more than 18 cannot be under the maximum.
        let whole_len = len as i64 + exponent;
        if whole_len > 18 {
            return Err(AmountError::TooLarge);
        }
        let whole_part = (0..whole_len.max(0)).fold(0_i64, |acc, i| {
            acc * 10 + i64::from(digits.get(i as usize).copied().unwrap_or(0))
        });
        let has_fraction = (len as i64) > whole_len;
        if whole_part > MAX_MAJOR_UNITS || (whole_part == MAX_MAJOR_UNITS && has_fraction) {
            return Err(AmountError::TooLarge);
        }
        // The last digit is not zero, so it sets the number of decimals.
        if exponent < -i64::from(currency.exponent()) {
            return Err(AmountError::TooPrecise {
                currency,
                exponent: currency.exponent(),
            });
        }
        // At most the maximum's 10 digits plus the currency's, so this cannot overflow.
        let scale = 10_i64.pow((exponent + i64::from(currency.exponent())) as u32);
        let minor = digits.iter().fold(0_i64, |acc, &d| acc * 10 + i64::from(d)) * scale;
        Ok(Money { minor, currency })
    }

    /// A threshold from the policy (any non-negative decimal) in `currency`'s minor units,
    /// rounded down: a limit is never made larger by rounding. Thresholds too large to
    /// represent saturate (the policy bounds them at load, so this is belt and braces).
    pub fn threshold_minor(value: Decimal, currency: Currency) -> i64 {
        value
            .checked_mul(Decimal::from(10_i64.pow(currency.exponent())))
            .and_then(|scaled| i64::try_from(scaled.floor()).ok())
            .unwrap_or(i64::MAX)
    }

    pub const fn from_minor(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    pub fn minor(&self) -> i64 {
        self.minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }
}

/// The JSON number grammar, sign allowed: `-?digits(.digits)?([eE][+-]?digits)?`. Refuses
/// what looser decimal parsers take (`1_000`, ` 12`, `+5`, `.5`, `1.`).
fn is_plain_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// The exponent after `e`: `[+-]?digits`, already checked by [`is_plain_number`]. Held within
/// ±1,000,000: any amount whose exponent reaches that is too large or too precise either way.
fn parse_exponent(text: &str) -> i64 {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let magnitude = digits.bytes().fold(0_i64, |acc, b| {
        (acc * 10 + i64::from(b - b'0')).min(1_000_000)
    });
    if negative { -magnitude } else { magnitude }
}

/// `minor` units shown with exactly `exponent` decimals (`MinorUnits(30000, 2)` shows as
/// `300.00`), written straight into whatever formats it.
#[derive(Clone, Copy, Debug)]
pub struct MinorUnits(pub i64, pub u32);

impl fmt::Display for MinorUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let MinorUnits(minor, exponent) = *self;
        let sign = if minor < 0 { "-" } else { "" };
        let abs = minor.unsigned_abs();
        if exponent == 0 {
            return write!(f, "{sign}{abs}");
        }
        let scale = 10_u64.pow(exponent);
        write!(
            f,
            "{sign}{}.{:0width$}",
            abs / scale,
            abs % scale,
            width = exponent as usize
        )
    }
}

impl serde::Serialize for MinorUnits {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Writes `minor` units with exactly `exponent` decimals: `format_minor(30000, 2)` is `300.00`.
pub fn format_minor(minor: i64, exponent: u32) -> String {
    MinorUnits(minor, exponent).to_string()
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        MinorUnits(self.minor, self.currency.exponent()).fmt(f)
    }
}

impl FromStr for Currency {
    type Err = CurrencyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(code: &str) -> Currency {
        Currency::parse(code).unwrap()
    }

    #[test]
    fn currencies_know_their_minor_units() {
        assert_eq!(cur("USD").exponent(), 2);
        assert_eq!(cur("JPY").exponent(), 0);
        assert_eq!(cur("BHD").exponent(), 3);
        assert_eq!(cur("EUR").code(), "EUR");
    }

    #[test]
    fn every_code_with_other_minor_units_is_a_listed_currency() {
        for list in [EXPONENT_0, EXPONENT_3, EXPONENT_4] {
            for code in list.split_ascii_whitespace() {
                assert!(
                    ISO_4217.split_ascii_whitespace().any(|c| c == code),
                    "{code}"
                );
            }
        }
        let count = exponents().iter().filter(|&&e| e != UNKNOWN).count();
        assert_eq!(count, ISO_4217.split_ascii_whitespace().count());
    }

    #[test]
    fn unknown_or_malformed_currencies_are_refused() {
        for bad in ["usd", "US", "USDD", "ABC", "", "XAU", "U$D"] {
            assert_eq!(Currency::parse(bad), Err(CurrencyError::Unknown), "{bad}");
        }
    }

    #[test]
    fn amounts_parse_exactly_into_minor_units() {
        assert_eq!(Money::parse("125.50", cur("USD")).unwrap().minor(), 12550);
        assert_eq!(Money::parse("125.5", cur("USD")).unwrap().minor(), 12550);
        assert_eq!(Money::parse("0.01", cur("USD")).unwrap().minor(), 1);
        assert_eq!(Money::parse("1e3", cur("USD")).unwrap().minor(), 100000);
        assert_eq!(Money::parse("1.2E1", cur("USD")).unwrap().minor(), 1200);
        assert_eq!(Money::parse("500", cur("JPY")).unwrap().minor(), 500);
        assert_eq!(Money::parse("1.234", cur("BHD")).unwrap().minor(), 1234);
        // Trailing zeros beyond the exponent are not extra precision.
        assert_eq!(Money::parse("10.000", cur("USD")).unwrap().minor(), 1000);
        // 0.1 + 0.2 style values stay exact.
        assert_eq!(Money::parse("0.30", cur("USD")).unwrap().minor(), 30);
        // More digits than a 96-bit decimal holds are read, not rounded.
        let usd = cur("USD");
        let exact = |text: &str| Money::parse(text, usd).map(|m| m.minor());
        assert_eq!(exact("0.00000000000000000000000000015e28"), Ok(150));
        assert_eq!(exact("0.000000000000000000000000000050e28"), Ok(50));
        assert_eq!(exact("1.000000000000000000000000000000000"), Ok(100));
        assert_eq!(exact("000000000000000000000000000000001.5"), Ok(150));
        assert_eq!(exact("125E-2"), Ok(125));
        assert_eq!(exact("0.0125e+4"), Ok(12500));
        assert_eq!(exact("1e9"), Ok(100_000_000_000));
        for too_precise in [
            "0.0000000000000000000000000001234e28",
            "0.0999999999999999999999999999999e1",
            "1.0000000000000000000000000000001",
            "1.0000000000000000000000000000001e0",
            "1e-3",
        ] {
            assert!(
                matches!(exact(too_precise), Err(AmountError::TooPrecise { .. })),
                "{too_precise}"
            );
        }
    }

    proptest::proptest! {
        /// Any way of writing an amount (zeros before it or after it, the point anywhere, an
        /// exponent or none) parses to exactly that amount; one more non-zero digit past the
        /// currency's decimals is refused, never rounded away.
        #[test]
        fn every_spelling_of_an_amount_parses_to_it(
            minor in 1_i64..=100_000_000_000,
            lead in 0_usize..20,
            trail in 0_usize..20,
            point: proptest::sample::Index,
            upper: bool,
            extra in proptest::option::of(1_u8..10),
        ) {
            // digits × 10^-(2 + trail + extra digit) is the amount in USD.
            let mut digits = format!("{}{minor}{}", "0".repeat(lead), "0".repeat(trail));
            let mut scale = 2 + trail as i64;
            if let Some(d) = extra {
                digits.push(char::from(b'0' + d));
                scale += 1;
            }
            // A point after `at` digits leaves `len - at` decimals; the exponent makes up the rest.
            let at = 1 + point.index(digits.len());
            let decimals = (digits.len() - at) as i64;
            let exponent = decimals - scale;
            let mantissa = if at == digits.len() {
                digits.clone()
            } else {
                format!("{}.{}", &digits[..at], &digits[at..])
            };
            let text = if exponent == 0 && !upper {
                mantissa
            } else {
                format!("{mantissa}{}{exponent}", if upper { 'E' } else { 'e' })
            };
            let parsed = Money::parse(&text, Currency::USD);
            match extra {
                None => proptest::prop_assert_eq!(parsed.map(|m| m.minor()), Ok(minor), "{}", text),
                Some(_) if minor == 100_000_000_000 => {
                    proptest::prop_assert_eq!(parsed, Err(AmountError::TooLarge), "{}", text)
                }
                Some(_) => proptest::prop_assert!(
                    matches!(parsed, Err(AmountError::TooPrecise { .. })),
                    "{}: {:?}", text, parsed
                ),
            }
        }
    }

    #[test]
    fn bad_amounts_are_refused_with_a_reason() {
        let usd = cur("USD");
        assert_eq!(Money::parse("0", usd), Err(AmountError::NotPositive));
        assert_eq!(Money::parse("-1.00", usd), Err(AmountError::NotPositive));
        assert_eq!(Money::parse("0.00", usd), Err(AmountError::NotPositive));
        assert!(matches!(
            Money::parse("1.001", usd),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            Money::parse("1.5", cur("JPY")),
            Err(AmountError::TooPrecise { .. })
        ));
        assert_eq!(Money::parse("1e300", usd), Err(AmountError::TooLarge));
        assert!(matches!(
            Money::parse("1e-300", usd),
            Err(AmountError::TooPrecise { .. })
        ));
        assert_eq!(
            Money::parse("1e99999999999999999999999999999999999999", usd),
            Err(AmountError::TooLarge)
        );
        assert_eq!(Money::parse("-0", usd), Err(AmountError::NotPositive));
        assert_eq!(Money::parse("0e5", usd), Err(AmountError::NotPositive));
        assert_eq!(Money::parse("-1e3", usd), Err(AmountError::NotPositive));
        assert_eq!(
            Money::parse("1000000000.01", usd),
            Err(AmountError::TooLarge)
        );
        assert_eq!(Money::parse("abc", usd), Err(AmountError::NotANumber));
        assert_eq!(Money::parse("NaN", usd), Err(AmountError::NotANumber));
        assert_eq!(Money::parse("", usd), Err(AmountError::NotANumber));
        for loose in [
            "1_000", "1_5", " 12.5", "12.5 ", "+12.5", ".5", "1.", "1e", "1e+", "0x10", "1,5", "١٢",
        ] {
            assert_eq!(
                Money::parse(loose, usd),
                Err(AmountError::NotANumber),
                "{loose:?}"
            );
        }
        assert_eq!(
            Money::parse("99999999999999999999999999999999", usd),
            Err(AmountError::TooLarge)
        );
        assert_eq!(
            Money::parse(&"9".repeat(65), usd),
            Err(AmountError::NotANumber),
            "longer than any amount needs"
        );
        // 64 characters as sent; serde_json hands a JSON number's exponent on with a `+`.
        let sent = format!("1e{}2", "0".repeat(61));
        assert_eq!(sent.len(), 64);
        let relayed = sent.replacen('e', "e+", 1);
        assert_eq!(Money::parse(&sent, usd).map(|m| m.minor()), Ok(10_000));
        assert_eq!(Money::parse(&relayed, usd).map(|m| m.minor()), Ok(10_000));
        assert_eq!(
            Money::parse(&format!("{relayed}0"), usd),
            Err(AmountError::NotANumber)
        );
    }

    #[test]
    fn the_largest_amount_is_accepted() {
        let m = Money::parse("1000000000.00", cur("USD")).unwrap();
        assert_eq!(m.minor(), 100_000_000_000);
    }

    #[test]
    fn amounts_print_with_the_currency_decimals() {
        assert_eq!(format_minor(30000, 2), "300.00");
        assert_eq!(format_minor(5, 2), "0.05");
        assert_eq!(format_minor(-5, 2), "-0.05");
        assert_eq!(format_minor(1234, 3), "1.234");
        assert_eq!(format_minor(500, 0), "500");
        assert_eq!(
            Money::parse("125.5", cur("USD")).unwrap().to_string(),
            "125.50"
        );
    }

    #[test]
    fn thresholds_round_down_into_minor_units() {
        let d = Decimal::from_str_exact("1000.00").unwrap();
        assert_eq!(Money::threshold_minor(d, cur("USD")), 100000);
        assert_eq!(Money::threshold_minor(d, cur("JPY")), 1000);
        let d = Decimal::from_str_exact("0.999").unwrap();
        assert_eq!(Money::threshold_minor(d, cur("USD")), 99);
        assert_eq!(Money::threshold_minor(Decimal::MAX, cur("BHD")), i64::MAX);
    }
}
