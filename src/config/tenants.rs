//! Validation of tenants (keys, allow-lists, limits, overflow and callbacks)
//! and prices.

use super::keys::{parse_configured_key, KeyDigest};
use super::raw::*;
use super::validate::is_identifier;
use super::*;
use crate::cost::ServiceTier;
use std::collections::HashMap;
use std::time::Duration;

pub(super) fn validate_tenants(
    raw: Vec<Option<RawTenant>>,
    models: &HashMap<String, usize>,
    problems: &mut Vec<Problem>,
) -> Vec<TenantSettings> {
    let mut tenants: Vec<TenantSettings> = Vec::new();
    // Every key digest seen so far, and the tenant it belongs to.
    let mut owners: HashMap<KeyDigest, usize> = HashMap::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("tenants[{i}]");
        if !is_identifier(&raw.id) {
            problems.push(problem(
                &join(&path, "id"),
                "must be 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if tenants.iter().any(|t| t.id == raw.id) {
            problems.push(problem(
                &join(&path, "id"),
                format!("duplicate tenant id '{}'", raw.id),
            ));
        }
        if raw.keys.is_empty() {
            problems.push(problem(
                &join(&path, "keys"),
                "at least one key is required",
            ));
        }
        let mut digests = Vec::with_capacity(raw.keys.len());
        for (k, key) in raw.keys.iter().enumerate() {
            let kpath = format!("{path}.keys[{k}]");
            match parse_configured_key(key) {
                None => problems.push(problem(
                    &kpath,
                    "a 'sha256:' key must be followed by 64 hex digits",
                )),
                Some(_) if !key.starts_with("sha256:") && key.len() < 8 => problems.push(problem(
                    &kpath,
                    "a plaintext key must be at least 8 characters",
                )),
                Some(digest) => {
                    digests.push(digest);
                    if let Some(&other) = owners.get(&digest) {
                        let owner = tenants
                            .get(other)
                            .map_or(raw.id.as_str(), |t| t.id.as_str());
                        problems.push(problem(
                            &kpath,
                            format!("the same key is already configured for tenant '{owner}'"),
                        ));
                    }
                }
            }
        }
        if let Some(allowed) = &raw.models {
            for (m, model) in allowed.iter().enumerate() {
                if !models.contains_key(model) {
                    problems.push(problem(
                        &format!("{path}.models[{m}]"),
                        format!("unknown model '{model}'"),
                    ));
                }
            }
        }
        let limits = raw
            .limits
            .map(|l| validate_limits(l, &format!("{path}.limits"), problems))
            .unwrap_or_default();
        let overflow = raw.overflow.map_or_else(TenantOverflow::default, |o| {
            let d = TenantOverflow::default();
            let max_wait = o.max_wait_seconds.unwrap_or(d.max_wait.as_secs());
            let max_parked = o.max_parked.unwrap_or(d.max_parked);
            if !(1..=3600).contains(&max_wait) {
                problems.push(problem(
                    &format!("{path}.overflow.max_wait_seconds"),
                    "must be between 1 and 3600",
                ));
            }
            if !(1..=1_000_000).contains(&max_parked) {
                problems.push(problem(
                    &format!("{path}.overflow.max_parked"),
                    "must be between 1 and 1000000",
                ));
            }
            let callbacks = o.callbacks.map(|c| {
                let mut allowed_urls = Vec::new();
                for (i, url) in c.allowed_urls.iter().enumerate() {
                    match CallbackUrl::parse(url) {
                        Ok(url) => allowed_urls.push(url),
                        Err(why) => problems.push(problem(
                            &format!("{path}.overflow.callbacks.allowed_urls[{i}]"),
                            format!("'{url}' is not a plain http(s) URL: {why}"),
                        )),
                    }
                }
                if c.secret.len() < 16 {
                    problems.push(problem(
                        &format!("{path}.overflow.callbacks.secret"),
                        "must be at least 16 characters",
                    ));
                }
                Callbacks {
                    allowed_urls,
                    secret: Secret(c.secret),
                }
            });
            let weight = o.weight.unwrap_or(d.weight);
            if !(1..=1000).contains(&weight) {
                problems.push(problem(
                    &format!("{path}.overflow.weight"),
                    "must be between 1 and 1000",
                ));
            }
            TenantOverflow {
                enabled: o.enabled,
                max_wait: Duration::from_secs(max_wait),
                max_parked,
                weight: weight.clamp(1, 1000),
                callbacks,
            }
        });
        for digest in &digests {
            owners.entry(*digest).or_insert(tenants.len());
        }
        tenants.push(TenantSettings {
            keys: digests,
            id: raw.id,
            allowed_models: raw.models.map(|m| m.into_iter().collect()),
            limits,
            overflow,
            cache: raw.cache.unwrap_or(true),
        });
    }
    tenants
}

pub(super) fn validate_limits(
    raw: RawLimits,
    path: &str,
    problems: &mut Vec<Problem>,
) -> TenantLimits {
    let positive = |value: Option<u64>, key: &str, problems: &mut Vec<Problem>| {
        if value == Some(0) {
            problems.push(problem(
                &join(path, key),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
    };
    positive(
        raw.requests_per_minute.map(u64::from),
        "requests_per_minute",
        problems,
    );
    positive(raw.tokens_per_minute, "tokens_per_minute", problems);
    positive(
        raw.max_concurrent.map(u64::from),
        "max_concurrent",
        problems,
    );
    let budget = raw.budget_usd.and_then(|b| {
        let bpath = join(path, "budget_usd");
        let period = match b.period.as_str() {
            "daily" => Some(BudgetPeriod::Daily),
            "monthly" => Some(BudgetPeriod::Monthly),
            "total" => Some(BudgetPeriod::Total),
            other => {
                problems.push(problem(
                    &join(&bpath, "period"),
                    format!("unknown period '{other}'; expected daily, monthly or total"),
                ));
                None
            }
        };
        if !(b.amount.is_finite() && b.amount > 0.0 && b.amount < 1e6) {
            problems.push(problem(
                &join(&bpath, "amount"),
                "must be a positive number of US dollars below 1,000,000",
            ));
            return None;
        }
        period.map(|period| Budget {
            amount_pusd: (b.amount * PICO_PER_USD).round() as i64,
            period,
        })
    });
    TenantLimits {
        requests_per_minute: raw.requests_per_minute,
        tokens_per_minute: raw.tokens_per_minute,
        max_concurrent: raw.max_concurrent,
        budget,
    }
}

/// A price at `path` in pico-dollars: USD per 1M units (`per_million`)
/// to pico-dollars per unit, or USD per unit to pico-dollars; zero when
/// none is given, or when it is out of bounds (a problem then).
fn price_pusd(usd: Option<f64>, path: &str, per_million: bool, problems: &mut Vec<Problem>) -> i64 {
    let Some(usd) = usd else { return 0 };
    let (bound, unit) = if per_million {
        (100_000.0, "USD per 1M")
    } else {
        (1_000.0, "USD")
    };
    if !(usd.is_finite() && (0.0..bound).contains(&usd)) {
        problems.push(problem(
            path,
            format!("must be a non-negative price in {unit} (below {bound})"),
        ));
        return 0;
    }
    (usd * if per_million { 1e6 } else { 1e12 }).round() as i64
}

/// The token prices of `pricing.<model>.service_tiers` (at `path`): a
/// mapping of `flex`, `priority` or `scale` to `input` and `output` (and
/// `cached_input`), USD per 1M tokens. A tier's `cached_input` defaults to
/// its `input` discounted as the standard price's is (OpenAI's tiers keep
/// the standard tier's cache discount).
fn tier_prices(
    value: Value,
    base: &Price,
    path: &str,
    problems: &mut Vec<Problem>,
) -> [Option<TokenPrice>; 3] {
    let mut tiers = [None; 3];
    let Value::Mapping(map) = value else {
        problems.push(problem(
            path,
            "must be a mapping of tier (flex, priority, scale) to input and output prices",
        ));
        return tiers;
    };
    for (name, raw) in map {
        let name = name.as_str().unwrap_or("?");
        let path = join(path, name);
        let known = ServiceTier::from_name(name).filter(|_| name != "fast" && name != "standard");
        let Some(at) = known.and_then(|tier| ServiceTier::PRICED.iter().position(|t| *t == tier))
        else {
            let hint = match name {
                "default" | "standard" => {
                    "the model's own input and output are the standard tier's prices"
                }
                "fast" => "OpenAI answers fast mode as priority: price it as priority",
                _ => "unknown tier (use flex, priority or scale)",
            };
            problems.push(problem(&path, hint));
            continue;
        };
        let Some(raw) = deserialize::<RawTierPrice>(raw, &path, problems) else {
            continue;
        };
        let (Some(input), Some(output)) = (raw.input, raw.output) else {
            problems.push(problem(&path, "give input and output (USD per 1M tokens)"));
            continue;
        };
        let mut usd =
            |usd: f64, key: &str| price_pusd(Some(usd), &join(&path, key), true, problems);
        let input = usd(input, "input");
        let output = usd(output, "output");
        let cached_input = match raw.cached_input {
            Some(cached) => usd(cached, "cached_input"),
            None if base.input > 0 => {
                let discounted =
                    i128::from(input) * i128::from(base.cached_input) / i128::from(base.input);
                i64::try_from(discounted).unwrap_or(input)
            }
            None => input,
        };
        tiers[at] = Some(TokenPrice {
            input,
            output,
            cached_input,
        });
    }
    tiers
}

pub(super) fn validate_pricing(
    value: Value,
    models: &HashMap<String, usize>,
    providers: &[ProviderSettings],
    problems: &mut Vec<Problem>,
) -> HashMap<String, Price> {
    let mut pricing = HashMap::new();
    let Value::Mapping(map) = value else {
        if !value.is_null() {
            problems.push(problem(
                "pricing",
                "must be a mapping of model name to prices",
            ));
        }
        return pricing;
    };
    for (name, raw) in map {
        let name = name.as_str().unwrap_or("?").to_string();
        let path = format!("pricing.{name}");
        // A public model name, or `provider/model` for one target's price.
        let known = models.contains_key(&name)
            || name
                .split_once('/')
                .is_some_and(|(provider, _)| providers.iter().any(|p| p.name == provider));
        if !known {
            problems.push(problem(
                &path,
                format!("unknown model '{name}' (use a public model name or provider/model)"),
            ));
            continue;
        }
        let Some(raw) = deserialize::<RawPrice>(raw, &path, problems) else {
            continue;
        };
        let tokens = raw.input.is_some() || raw.output.is_some();
        let units = [
            raw.per_request,
            raw.per_image,
            raw.per_audio_second,
            raw.per_1m_characters,
        ];
        if !tokens && units.iter().all(Option::is_none) {
            problems.push(problem(
                &path,
                "give input and output (USD per 1M tokens), or per_request, per_image, per_audio_second or per_1m_characters",
            ));
            continue;
        }
        if tokens && (raw.input.is_none() || raw.output.is_none()) {
            let missing = if raw.input.is_none() {
                "input"
            } else {
                "output"
            };
            problems.push(problem(
                &join(&path, missing),
                "input and output are priced together (USD per 1M tokens)",
            ));
            continue;
        }
        let mut price_of = |usd: Option<f64>, key: &str, per_million: bool| {
            price_pusd(usd, &join(&path, key), per_million, problems)
        };
        let mut price = Price {
            input: price_of(raw.input, "input", true),
            output: price_of(raw.output, "output", true),
            cached_input: price_of(raw.cached_input.or(raw.input), "cached_input", true),
            request: price_of(raw.per_request, "per_request", false),
            image: price_of(raw.per_image, "per_image", false),
            audio_second: price_of(raw.per_audio_second, "per_audio_second", false),
            character: price_of(raw.per_1m_characters, "per_1m_characters", true),
            tiers: [None; 3],
        };
        if let Some(tiers) = raw.service_tiers {
            let path = join(&path, "service_tiers");
            if tokens {
                price.tiers = tier_prices(tiers, &price, &path, problems);
            } else {
                problems.push(problem(
                    &path,
                    "processing tiers price tokens: give the model's input and output too",
                ));
            }
        }
        pricing.insert(name, price);
    }
    pricing
}
