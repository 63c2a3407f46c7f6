//! The customer-base models: BG/NBD (Fader, Hardie & Lee 2005, "Counting your
//! customers the easy way") for whether a customer is still active and how many
//! purchases to expect, and Gamma–Gamma (Fader, Hardie & Lee 2005, "RFM and CLV") for
//! the value of an order. Each is fitted by maximum likelihood on a population of
//! customer summaries; the formulas follow the papers (and the `lifetimes` package,
//! which the tests and BENCHMARKS.md compare with).

use serde::{Deserialize, Serialize};

use super::math::{hyp2f1, ln_gamma, ln_rising, minimise};

/// One customer as the models see them, in days: `x` repeat purchases (purchase days
/// after the first), the last one `t_x` days after the first, observed for `t` days
/// since the first; `m` the mean value of the repeat purchases (when they have one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub x: u32,
    pub t_x: f64,
    pub t: f64,
    pub m: Option<f64>,
}

/// BG/NBD parameters: purchase rates are Gamma(r, α) across customers; after each
/// purchase a customer drops out with a probability that is Beta(a, b) across them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BgNbd {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
}

/// Gamma–Gamma parameters: order values are Gamma(p, ν) per customer, ν is Gamma(q, γ)
/// across customers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GammaGamma {
    pub p: f64,
    pub q: f64,
    pub gamma: f64,
}

/// How a fit went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Customers (rows with their multiplicity) the fit saw.
    pub customers: u64,
    /// The maximised log-likelihood (summed over customers).
    pub log_likelihood: f64,
    pub evaluations: usize,
    pub converged: bool,
}

/// The minimiser's limits: a relative tolerance on the log-likelihood and a bound on
/// its evaluations (each one a pass over the distinct rows).
const TOLERANCE: f64 = 1e-12;
const MAX_EVALUATIONS: usize = 20_000;

impl BgNbd {
    /// ln L(r, α, a, b | x, t_x, T).
    pub fn log_likelihood(&self, s: &Summary) -> f64 {
        self.ln_head(s.x) + self.ln_tail(s)
    }

    /// The part of ln L that depends on x only.
    fn ln_head(&self, x: u32) -> f64 {
        let BgNbd { r, alpha, a, b } = *self;
        ln_rising(r, x) + r * alpha.ln() + ln_rising(b, x) - ln_rising(a + b, x)
    }

    /// The rest of ln L.
    fn ln_tail(&self, s: &Summary) -> f64 {
        let BgNbd { r, alpha, a, b } = *self;
        let x = s.x as f64;
        let a3 = -(r + x) * (alpha + s.t).ln();
        if s.x == 0 {
            return a3;
        }
        let a4 = a.ln() - (b + x - 1.0).ln() - (r + x) * (alpha + s.t_x).ln();
        let hi = a3.max(a4);
        hi + ((a3 - hi).exp() + (a4 - hi).exp()).ln()
    }

    /// The maximum-likelihood parameters for `rows` (each with its multiplicity), found
    /// over their logarithms so they stay positive.
    pub fn fit(rows: &[(Summary, u64)]) -> (BgNbd, FitReport) {
        let mut rows = rows.to_vec();
        rows.sort_by_key(|(s, _)| s.x);
        let of = |v: &[f64]| BgNbd {
            r: v[0].exp(),
            alpha: v[1].exp(),
            a: v[2].exp(),
            b: v[3].exp(),
        };
        let mut f = |v: &[f64]| {
            let m = of(v);
            let (mut total, mut x, mut head) = (0.0, u32::MAX, 0.0);
            for (s, n) in &rows {
                if s.x != x {
                    (x, head) = (s.x, m.ln_head(s.x));
                }
                total += *n as f64 * (head + m.ln_tail(s));
            }
            -total
        };
        let best = minimise(&mut f, &[0.0; 4], TOLERANCE, MAX_EVALUATIONS);
        let report = FitReport {
            customers: rows.iter().map(|(_, n)| n).sum(),
            log_likelihood: -best.value,
            evaluations: best.evaluations,
            converged: best.converged,
        };
        (of(&best.x), report)
    }

    /// (a / (b + x − 1)) ((α + T) / (α + t_x))^(r + x), zero without repeat purchases.
    fn dropout_odds(&self, s: &Summary) -> f64 {
        if s.x == 0 {
            return 0.0;
        }
        let x = s.x as f64;
        self.a / (self.b + x - 1.0)
            * ((self.r + x) * ((self.alpha + s.t).ln() - (self.alpha + s.t_x).ln())).exp()
    }

    /// P(still active | x, t_x, T). A customer without repeat purchases is active by
    /// the model's assumption (dropping out happens only after a purchase).
    pub fn p_alive(&self, s: &Summary) -> f64 {
        1.0 / (1.0 + self.dropout_odds(s))
    }

    /// E[purchases in the next `horizon` days | x, t_x, T].
    pub fn expected_purchases(&self, s: &Summary, horizon: f64) -> f64 {
        let BgNbd { r, alpha, a, b } = *self;
        let x = s.x as f64;
        let z = horizon / (alpha + s.t + horizon);
        let head = (a + b + x - 1.0) / (a - 1.0);
        let tail = 1.0
            - ((alpha + s.t) / (alpha + s.t + horizon)).powf(r + x)
                * hyp2f1(r + x, b + x, a + b + x - 1.0, z);
        (head * tail / (1.0 + self.dropout_odds(s))).max(0.0)
    }
}

impl GammaGamma {
    /// ln L(p, q, γ | x, m) of a customer with repeat purchases of mean value m.
    fn log_likelihood(&self, x: f64, m: f64) -> f64 {
        let GammaGamma { p, q, gamma } = *self;
        ln_gamma(p * x + q) - ln_gamma(p * x) - ln_gamma(q)
            + q * gamma.ln()
            + (p * x - 1.0) * m.ln()
            + p * x * x.ln()
            - (p * x + q) * (x * m + gamma).ln()
    }

    /// The maximum-likelihood parameters over the customers with repeat purchases of a
    /// positive mean value; None when fewer than 10 such customers exist.
    pub fn fit(rows: &[(Summary, u64)]) -> Option<(GammaGamma, FitReport)> {
        let valued: Vec<(f64, f64, f64)> = rows
            .iter()
            .filter_map(|(s, n)| match s.m {
                Some(m) if s.x > 0 && m > 0.0 => Some((s.x as f64, m, *n as f64)),
                _ => None,
            })
            .collect();
        if valued.iter().map(|v| v.2).sum::<f64>() < 10.0 {
            return None;
        }
        let of = |v: &[f64]| GammaGamma {
            p: v[0].exp(),
            q: v[1].exp(),
            gamma: v[2].exp(),
        };
        let mut f = |v: &[f64]| {
            let g = of(v);
            -valued
                .iter()
                .map(|(x, m, n)| n * g.log_likelihood(*x, *m))
                .sum::<f64>()
        };
        let best = minimise(&mut f, &[0.0; 3], TOLERANCE, MAX_EVALUATIONS);
        let report = FitReport {
            customers: valued.iter().map(|v| v.2 as u64).sum(),
            log_likelihood: -best.value,
            evaluations: best.evaluations,
            converged: best.converged,
        };
        Some((of(&best.x), report))
    }

    /// E[value of an order | x repeat purchases of mean m]; the population's mean for a
    /// customer without repeat purchases. None when q ≤ 1 (the mean is not finite).
    pub fn expected_order_value(&self, s: &Summary) -> Option<f64> {
        let GammaGamma { p, q, gamma } = *self;
        if q <= 1.0 {
            return None;
        }
        Some(match s.m {
            Some(m) if s.x > 0 => p * (gamma + s.x as f64 * m) / (p * s.x as f64 + q - 1.0),
            _ => p * gamma / (q - 1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CDNOW sample's calibration summary as the `lifetimes` package ships it
    /// (2,357 customers, weeks; MIT licence): ID, frequency, recency, T.
    const CDNOW: &str = include_str!("../../tests/data/cdnow_customers_summary.csv");

    /// The rows of a CDNOW summary file (ID, x, t_x, T[, mean value]), each once.
    fn rows(text: &str) -> Vec<(Summary, u64)> {
        text.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<f64> = l.split(',').map(|v| v.parse().unwrap()).collect();
                let s = Summary {
                    x: f[1] as u32,
                    t_x: f[2],
                    t: f[3],
                    m: f.get(4).copied(),
                };
                (s, 1)
            })
            .collect()
    }

    /// The paper's estimates on this sample are r = 0.243, α = 4.414, a = 0.793,
    /// b = 2.426 and ln L = −9582.4; `lifetimes` 0.11.3 gives r = 0.242593,
    /// α = 4.413532, a = 0.792886, b = 2.425752.
    #[test]
    fn bgnbd_fits_the_cdnow_sample_as_the_paper_does() {
        let rows = rows(CDNOW);
        assert_eq!(rows.len(), 2357);
        let (m, report) = BgNbd::fit(&rows);
        assert!(report.converged, "{report:?}");
        let close = |got: f64, want: f64| (got - want).abs() < 0.0015 * want.abs().max(1.0);
        assert!(close(m.r, 0.243), "{m:?}");
        assert!(close(m.alpha, 4.414), "{m:?}");
        assert!(close(m.a, 0.793), "{m:?}");
        assert!(close(m.b, 2.426), "{m:?}");
        assert!((report.log_likelihood + 9582.4).abs() < 0.1, "{report:?}");
    }

    /// Values from the paper's parameters checked against `lifetimes` 0.11.3
    /// (`conditional_probability_alive`, `conditional_expected_number_of_purchases_up_to_time`).
    #[test]
    fn predictions_match_lifetimes() {
        let m = BgNbd {
            r: 0.242593,
            alpha: 4.413641,
            a: 0.792919,
            b: 2.425907,
        };
        let s = Summary {
            x: 2,
            t_x: 30.43,
            t: 38.86,
            m: None,
        };
        assert!(
            (m.p_alive(&s) - 0.726_610).abs() < 1e-5,
            "{}",
            m.p_alive(&s)
        );
        let e = m.expected_purchases(&s, 39.0);
        assert!((e - 1.225_907).abs() < 1e-5, "{e}");
        let new = Summary {
            x: 0,
            t_x: 0.0,
            t: 38.86,
            m: None,
        };
        assert_eq!(m.p_alive(&new), 1.0);
        let e = m.expected_purchases(&new, 39.0);
        assert!((e - 0.194_781).abs() < 1e-5, "{e}");
    }

    /// The same sample with each customer's mean repeat-order value (`zbar`), as
    /// `lifetimes` ships it: its `GammaGammaFitter` gives p = 6.248802, q = 3.744588,
    /// ν = 15.447748 on the 946 customers with repeat purchases, and an expected order
    /// value of 30.931117 for two repeat purchases of mean 30.
    #[test]
    fn gamma_gamma_fits_the_cdnow_sample_as_lifetimes_does() {
        const VALUED: &str =
            include_str!("../../tests/data/cdnow_customers_summary_with_transactions.csv");
        let rows = rows(VALUED);
        let (g, report) = GammaGamma::fit(&rows).unwrap();
        assert!(report.converged, "{report:?}");
        assert_eq!(report.customers, 946);
        let close = |got: f64, want: f64| (got - want).abs() < 1e-3 * want;
        assert!(close(g.p, 6.248802), "{g:?}");
        assert!(close(g.q, 3.744588), "{g:?}");
        assert!(close(g.gamma, 15.447748), "{g:?}");
        let lt = GammaGamma {
            p: 6.248802,
            q: 3.744588,
            gamma: 15.447748,
        };
        let two = Summary {
            x: 2,
            t_x: 1.0,
            t: 2.0,
            m: Some(30.0),
        };
        assert!((lt.expected_order_value(&two).unwrap() - 30.931117).abs() < 1e-5);
    }
}
