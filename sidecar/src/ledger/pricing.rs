//! The cost of one request in pico-units (1e-12) of currency, from a per-token or per-hour price.
//!
//! With prices in millionths of currency per million tokens, one token costs exactly the price's
//! millionths in pico-units, so per-token costs need no rounding. A per-hour price is converted
//! by engine time and rounded half up to a whole pico-unit, once per cost component and request.

use crate::config::{Micros, Price};

/// Fewest computed tokens whose prefill time gives a request its own prefill rate. Shorter
/// prefills are dominated by fixed overhead.
const MIN_RATE_TOKENS: u64 = 16;

/// A request's token counts and the engine's measured times.
#[derive(Debug, Clone, Copy)]
pub(super) struct Usage {
    pub prompt_tokens: u64,
    /// At most `prompt_tokens`.
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub prefill_ms: Option<f64>,
    pub decode_ms: Option<f64>,
}

/// Engine speeds measured by the sidecar, for hourly prices without configured rates.
#[derive(Debug, Clone, Copy)]
pub(super) struct Measured {
    pub prefill_us_per_token: f64,
    /// None until a request reported its decode time.
    pub decode_us_per_token: Option<f64>,
}

/// A request's costs in pico-units of currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Charge {
    pub served_pico: u64,
    /// The cost had the engine computed the whole prompt.
    pub uncached_pico: u64,
    /// True when an hourly price had no decode rate and no measured decode time, so the output
    /// tokens cost nothing.
    pub decode_unpriced: bool,
}

/// Returns the costs of one request. Without a price, both are zero.
pub(super) fn charge(price: Option<&Price>, usage: &Usage, measured: &Measured) -> Charge {
    match price {
        None => Charge::default(),
        Some(Price::Tokens { input, cached_input, output }) => {
            let computed = usage.prompt_tokens - usage.cached_tokens;
            let generated = tokens_at(usage.output_tokens, *output);
            let served = tokens_at(computed, *input).saturating_add(tokens_at(usage.cached_tokens, *cached_input)).saturating_add(generated);
            let uncached = tokens_at(usage.prompt_tokens, *input).saturating_add(generated);
            Charge { served_pico: clamp(served), uncached_pico: clamp(uncached), decode_unpriced: false }
        }
        Some(Price::Hourly { engine_per_hour, prefill_tokens_per_second, decode_tokens_per_second }) => {
            let (prefill_served, prefill_uncached) = prefill(*engine_per_hour, *prefill_tokens_per_second, usage, measured);
            let (decode, decode_unpriced) = decode(*engine_per_hour, *decode_tokens_per_second, usage, measured);
            Charge {
                served_pico: prefill_served.saturating_add(decode),
                uncached_pico: prefill_uncached.saturating_add(decode),
                decode_unpriced,
            }
        }
    }
}

/// Returns the cost of `tokens` at `price` millionths per million tokens, in pico-units.
fn tokens_at(tokens: u64, price: Micros) -> u128 {
    u128::from(tokens) * u128::from(price.0)
}

fn clamp(pico: u128) -> u64 {
    u64::try_from(pico).unwrap_or(u64::MAX)
}

/// Returns the prefill costs as served and uncached. Cached tokens cost nothing as served.
fn prefill(per_hour: Micros, rate: Option<Micros>, usage: &Usage, measured: &Measured) -> (u64, u64) {
    let computed = usage.prompt_tokens - usage.cached_tokens;
    if let Some(rate) = rate {
        return (at_rate(computed, per_hour, rate), at_rate(usage.prompt_tokens, per_hour, rate));
    }
    // The engine's own prefill time is the served cost. The cached tokens are priced at this
    // request's prefill rate when it computed enough tokens, else at the sidecar's moving average.
    let prefill_ms = valid_ms(usage.prefill_ms);
    let own_rate = prefill_ms.filter(|_| computed >= MIN_RATE_TOKENS).map(|ms| ms * 1000.0 / computed as f64);
    let us_per_token = own_rate.unwrap_or(measured.prefill_us_per_token);
    let served_us = prefill_ms.map(|ms| ms * 1000.0).unwrap_or(computed as f64 * us_per_token);
    let uncached_us = served_us + usage.cached_tokens as f64 * us_per_token;
    (for_time(served_us, per_hour), for_time(uncached_us, per_hour))
}

/// Returns the decode cost, and whether it could not be priced.
fn decode(per_hour: Micros, rate: Option<Micros>, usage: &Usage, measured: &Measured) -> (u64, bool) {
    if let Some(rate) = rate {
        return (at_rate(usage.output_tokens, per_hour, rate), false);
    }
    if let Some(ms) = valid_ms(usage.decode_ms) {
        return (for_time(ms * 1000.0, per_hour), false);
    }
    if usage.output_tokens == 0 {
        return (0, false);
    }
    match measured.decode_us_per_token {
        Some(us_per_token) => (for_time(usage.output_tokens as f64 * us_per_token, per_hour), false),
        None => (0, true),
    }
}

/// Returns a measured time in ms when it is a finite, non-negative number.
pub(super) fn valid_ms(ms: Option<f64>) -> Option<f64> {
    ms.filter(|ms| ms.is_finite() && *ms >= 0.0)
}

/// Returns the cost of `tokens` at `rate` millionths of a token per second and `per_hour`
/// millionths of currency per hour, in pico-units rounded half up:
/// tokens / (rate / 1e6) s x per_hour / 1e6 / 3600 per s x 1e12 = tokens x per_hour x 1e12 / (3600 x rate).
fn at_rate(tokens: u64, per_hour: Micros, rate: Micros) -> u64 {
    let denominator = 3600 * u128::from(rate.0);
    if denominator == 0 {
        return 0;
    }
    let numerator = u128::from(tokens).checked_mul(u128::from(per_hour.0)).and_then(|product| product.checked_mul(1_000_000_000_000));
    match numerator.and_then(|numerator| numerator.checked_add(denominator / 2)) {
        Some(numerator) => clamp(numerator / denominator),
        None => u64::MAX,
    }
}

/// Returns the cost of `us` microseconds of engine time at `per_hour` millionths of currency per
/// hour, in pico-units rounded half up. One microsecond costs per_hour / 3600 pico-units.
fn for_time(us: f64, per_hour: Micros) -> u64 {
    let pico = per_hour.0 as f64 * us / 3600.0;
    // `as` saturates at u64::MAX.
    if pico.is_finite() && pico > 0.0 { pico.round() as u64 } else { 0 }
}
