//! Statistics for the distribution tests (engine and store).

/// Pearson's chi-square of `counts` against `expected` shares (summing to 1).
pub(crate) fn chi_square(counts: &[u64], expected: &[f64]) -> f64 {
    let n = counts.iter().sum::<u64>() as f64;
    counts
        .iter()
        .zip(expected)
        .map(|(&c, &p)| n.mul_add(-p, c as f64).powi(2) / (n * p))
        .sum()
}

/// Pearson's chi-square of `counts` against shares in proportion to `weights`.
pub(crate) fn chi_square_by_weight(counts: &[u64], weights: &[u32]) -> f64 {
    let total: u32 = weights.iter().sum();
    let expected: Vec<f64> = weights
        .iter()
        .map(|&w| f64::from(w) / f64::from(total))
        .collect();
    chi_square(counts, &expected)
}
