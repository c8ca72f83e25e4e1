//! Whose queue head the drain serves next: a weighted round robin over the
//! tenants (`overflow.weight`). Each tenant in turn may take up to its
//! weight of heads per round; when the instance runs out of job slots in
//! the middle of a tenant's turn, the next round starts with that tenant's
//! remaining share, so freed capacity goes out in proportion to the
//! weights while every tenant with work gets its turn (none starves).

/// The drain's place in the rotation.
#[derive(Debug, Clone)]
pub(super) struct Turns {
    weights: Vec<u32>,
    /// The tenant whose turn it is, and heads it has taken in that turn.
    current: usize,
    used: u32,
}

/// How one visit to a tenant's queue head went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Visit {
    /// Nothing queued.
    Empty,
    /// A head was admitted, started, or cleared away: it took a share.
    Served,
    /// The head must wait (over its limits, nothing can serve its model,
    /// another instance's client): the tenant's turn ends.
    Blocked,
    /// An async head, and every job slot of this instance is taken.
    NoSlot,
}

impl Turns {
    /// A rotation over tenants with these weights (each at least 1).
    pub(super) fn new(weights: Vec<u32>) -> Self {
        Turns {
            weights: weights.into_iter().map(|w| w.max(1)).collect(),
            current: 0,
            used: 0,
        }
    }

    /// The heads `tenant` may take in a turn of its own: its weight.
    pub(super) fn share(&self, tenant: usize) -> u32 {
        self.weights[tenant]
    }

    /// The tenants to visit this round, in order, each with the heads it
    /// may take.
    pub(super) fn round(&self) -> Vec<(usize, u32)> {
        let n = self.weights.len();
        (0..n)
            .map(|step| {
                let tenant = (self.current + step) % n;
                let used = if step == 0 { self.used } else { 0 };
                (tenant, self.weights[tenant].saturating_sub(used))
            })
            .collect()
    }

    /// The round is over: `stopped` is the first tenant whose turn was cut
    /// short for want of a slot, with the heads it took in the round.
    pub(super) fn end_round(&mut self, stopped: Option<(usize, u32)>) {
        let n = self.weights.len().max(1);
        match stopped {
            Some((tenant, took)) => {
                let used = if tenant == self.current {
                    self.used + took
                } else {
                    took
                };
                if used >= self.weights[tenant] {
                    self.current = (tenant + 1) % n;
                    self.used = 0;
                } else {
                    self.current = tenant;
                    self.used = used;
                }
            }
            None => {
                self.current = (self.current + 1) % n;
                self.used = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds of a drain with `slots` job slots over always-busy tenants,
    /// one slot freed per round: who got each slot.
    fn served(weights: &[u32], slots: usize, rounds: usize) -> Vec<usize> {
        let mut turns = Turns::new(weights.to_vec());
        let mut free = slots;
        let mut got = Vec::new();
        for _ in 0..rounds {
            let mut stopped = None;
            for (tenant, share) in turns.round() {
                let mut took = 0;
                while took < share {
                    if free == 0 {
                        stopped.get_or_insert((tenant, took));
                        break;
                    }
                    free -= 1;
                    took += 1;
                    got.push(tenant);
                }
            }
            turns.end_round(stopped);
            free += 1;
        }
        got
    }

    #[test]
    fn freed_slots_follow_the_weights() {
        let got = served(&[3, 1], 2, 400);
        let a = got.iter().filter(|t| **t == 0).count() as f64;
        let b = got.iter().filter(|t| **t == 1).count() as f64;
        assert!((a / b - 3.0).abs() < 0.1, "{a}:{b}");
        let got = served(&[1, 1, 2], 1, 400);
        let counts: Vec<usize> = (0..3)
            .map(|t| got.iter().filter(|g| **g == t).count())
            .collect();
        assert!(counts[2].abs_diff(2 * counts[0]) <= 2, "{counts:?}");
        assert!(counts[0].abs_diff(counts[1]) <= 1, "{counts:?}");
    }

    #[test]
    fn nobody_starves_under_a_heavy_weight() {
        let got = served(&[1000, 1], 1, 3000);
        assert!(got.contains(&1), "the light tenant got a turn");
    }

    #[test]
    fn without_a_shortage_every_tenant_takes_its_whole_share_each_round() {
        let mut turns = Turns::new(vec![3, 1, 0]);
        assert_eq!(turns.round(), [(0, 3), (1, 1), (2, 1)]);
        turns.end_round(None);
        assert_eq!(turns.round(), [(1, 1), (2, 1), (0, 3)]);
        // Cut short after two of its three: it resumes with one.
        turns.end_round(Some((0, 2)));
        assert_eq!(turns.round()[0], (0, 1));
        turns.end_round(Some((0, 1)));
        assert_eq!(turns.round()[0], (1, 1));
    }
}
