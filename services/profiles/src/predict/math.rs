//! The numerics the customer-base models need: the log-gamma function, the Gauss
//! hypergeometric series and a Nelder–Mead minimiser. Plain `f64`, no allocation per
//! call (the minimiser allocates its simplex once).

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms; relative error below 1e-14), with the
/// reflection formula below ½. Not finite at the poles (0, −1, …).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Γ(x) Γ(1 − x) = π / sin(πx)
        let s = (std::f64::consts::PI * x).sin().abs();
        return std::f64::consts::PI.ln() - s.ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ln Γ(s + n) − ln Γ(s) for a whole n ≥ 0: a sum of n logarithms when n is small,
/// which is exact where the difference of two large ln Γ loses digits.
pub fn ln_rising(s: f64, n: u32) -> f64 {
    if n <= 64 {
        (0..n).map(|k| (s + k as f64).ln()).sum()
    } else {
        ln_gamma(s + n as f64) - ln_gamma(s)
    }
}

/// The Gauss hypergeometric function ₂F₁(a, b; c; z) for 0 ≤ z < 1 by its series, summed
/// until a term no longer changes the sum (at most 200,000 terms: z = 0.9999 needs
/// ~100,000).
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    debug_assert!((0.0..1.0).contains(&z), "z = {z}");
    let (mut term, mut sum) = (1.0f64, 1.0f64);
    for k in 0..200_000u32 {
        let k = k as f64;
        term *= (a + k) * (b + k) / ((c + k) * (k + 1.0)) * z;
        sum += term;
        if term.abs() <= 1e-15 * sum.abs() {
            break;
        }
    }
    sum
}

/// What a minimisation gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub value: f64,
    /// Function evaluations used.
    pub evaluations: usize,
    /// Whether the simplex shrank below the tolerance (false: it hit the limit).
    pub converged: bool,
}

/// Minimises `f` from `start` by Nelder–Mead (standard coefficients), restarted from its
/// own result until a restart no longer improves it: a simplex that collapsed early is
/// rebuilt around the best point. Stops when the simplex's values differ by less than
/// `tolerance` (relative) or after `max_evaluations`. A non-finite value counts as +∞.
pub fn minimise(
    f: &mut dyn FnMut(&[f64]) -> f64,
    start: &[f64],
    tolerance: f64,
    max_evaluations: usize,
) -> Minimum {
    let mut best = nelder_mead(f, start, tolerance, max_evaluations);
    while best.evaluations < max_evaluations {
        let left = max_evaluations - best.evaluations;
        let again = nelder_mead(f, &best.x, tolerance, left);
        let improved = again.value < best.value - tolerance * best.value.abs().max(1.0);
        let evaluations = best.evaluations + again.evaluations;
        if again.value <= best.value {
            best = Minimum {
                evaluations,
                ..again
            };
        } else {
            best.evaluations = evaluations;
        }
        if !improved {
            break;
        }
    }
    best
}

fn nelder_mead(
    f: &mut dyn FnMut(&[f64]) -> f64,
    start: &[f64],
    tolerance: f64,
    max_evaluations: usize,
) -> Minimum {
    let n = start.len();
    let mut evaluations = 0;
    let mut eval = |x: &[f64], evaluations: &mut usize| {
        *evaluations += 1;
        let v = f(x);
        if v.is_finite() { v } else { f64::INFINITY }
    };
    // The first simplex: the start and a step of 0.5 (or 5 %) along each axis.
    let mut simplex: Vec<(Vec<f64>, f64)> = Vec::with_capacity(n + 1);
    simplex.push((start.to_vec(), eval(start, &mut evaluations)));
    for i in 0..n {
        let mut x = start.to_vec();
        x[i] += if x[i].abs() > 1e-3 {
            0.05 * x[i].abs().max(10.0)
        } else {
            0.5
        };
        let v = eval(&x, &mut evaluations);
        simplex.push((x, v));
    }
    let mut converged = false;
    while evaluations < max_evaluations {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (lo, hi) = (simplex[0].1, simplex[n].1);
        if (hi - lo).abs() <= tolerance * (lo.abs() + hi.abs()).max(1e-300) * 0.5 {
            converged = true;
            break;
        }
        let centroid: Vec<f64> = (0..n)
            .map(|j| simplex[..n].iter().map(|(x, _)| x[j]).sum::<f64>() / n as f64)
            .collect();
        let toward = |t: f64| -> Vec<f64> {
            (0..n)
                .map(|j| centroid[j] + t * (simplex[n].0[j] - centroid[j]))
                .collect()
        };
        let reflected = toward(-1.0);
        let vr = eval(&reflected, &mut evaluations);
        if vr < simplex[0].1 {
            let expanded = toward(-2.0);
            let ve = eval(&expanded, &mut evaluations);
            simplex[n] = if ve < vr {
                (expanded, ve)
            } else {
                (reflected, vr)
            };
        } else if vr < simplex[n - 1].1 {
            simplex[n] = (reflected, vr);
        } else {
            // Outside the reflected point if it beat the worst, else inside; kept if it
            // beats the better of the two.
            let (t, bound) = if vr < simplex[n].1 {
                (-0.5, vr)
            } else {
                (0.5, simplex[n].1)
            };
            let contracted = toward(t);
            let vc = eval(&contracted, &mut evaluations);
            if vc < bound {
                simplex[n] = (contracted, vc);
            } else {
                // Shrink every point toward the best.
                let best = simplex[0].0.clone();
                for s in simplex.iter_mut().skip(1) {
                    for (x, b) in s.0.iter_mut().zip(&best) {
                        *x = b + 0.5 * (*x - b);
                    }
                    s.1 = eval(&s.0, &mut evaluations);
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (x, value) = simplex.swap_remove(0);
    Minimum {
        x,
        value,
        evaluations,
        converged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_known_values() {
        // Γ(1) = Γ(2) = 1, Γ(5) = 24, Γ(½) = √π, Γ(0.1) = 9.51350769866873.
        assert!(ln_gamma(1.0).abs() < 1e-14);
        assert!(ln_gamma(2.0).abs() < 1e-14);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-14);
        assert!((ln_gamma(0.1) - 9.513_507_698_668_73f64.ln()).abs() < 1e-13);
        // ln Γ(171) = ln(170!) = 706.5730622457874
        assert!((ln_gamma(171.0) - 706.573_062_245_787_4).abs() < 1e-9);
        assert!((ln_rising(0.25, 7) - (ln_gamma(7.25) - ln_gamma(0.25))).abs() < 1e-12);
        assert!((ln_rising(3.5, 100) - (ln_gamma(103.5) - ln_gamma(3.5))).abs() < 1e-9);
    }

    #[test]
    fn hyp2f1_matches_closed_forms() {
        // ₂F₁(1, 1; 2; z) = −ln(1 − z)/z; ₂F₁(a, b; b; z) = (1 − z)^−a.
        for z in [0.0f64, 0.1, 0.5, 0.9, 0.99] {
            let want = if z == 0.0 { 1.0 } else { -(1.0 - z).ln() / z };
            assert!(
                (hyp2f1(1.0, 1.0, 2.0, z) - want).abs() < 1e-10 * want,
                "{z}"
            );
            let want = (1.0 - z).powf(-0.3);
            assert!(
                (hyp2f1(0.3, 2.5, 2.5, z) - want).abs() < 1e-10 * want,
                "{z}"
            );
        }
    }

    #[test]
    fn minimise_finds_the_rosenbrock_valley_floor() {
        let mut evaluations = 0;
        let mut f = |x: &[f64]| {
            evaluations += 1;
            (1.0 - x[0]).powi(2) + 100.0 * (x[1] - x[0] * x[0]).powi(2)
        };
        let m = minimise(&mut f, &[-1.2, 1.0], 1e-14, 10_000);
        assert!(m.converged);
        assert!(
            (m.x[0] - 1.0).abs() < 1e-4 && (m.x[1] - 1.0).abs() < 1e-4,
            "{m:?}"
        );
        assert_eq!(m.evaluations, evaluations);
    }
}
