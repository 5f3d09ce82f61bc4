//! REPLEX traffic shares, sans I/O (Fischer, Kammenhuber, Feldmann, "REPLEX: Dynamic
//! Traffic Engineering Based on Wardrop Routing Policies", CoNEXT 2006; seeds-digest items
//! 66–69; `replex-spec.md` §3).
//!
//! For one destination (a peer), several routes are in use at once — the direct path and
//! one-hop relays — each with a traffic share. Every round (`period`, about a second) the
//! shares move towards the cheaper routes, in proportion to the cost difference, until the
//! used routes cost the same: a Wardrop equilibrium. The update is the expected (fluid) form
//! of the (α,β)-exploration-replication policy (Fischer, Räcke, Vöcking, STOC 2006): a
//! route's traffic samples another route with probability `(1−β)·s_Q + β/n` (replication
//! plus exploration) and migrates to it with probability `λ·(ℓ_P − ℓ_Q − θ)/(ℓ_P + α_off)`
//! when that is positive; all transfers are computed from one snapshot of shares and costs
//! (a Jacobi update). It conserves traffic, never moves more than `λ` of it per round, only
//! moves it towards strictly cheaper routes, and does not oscillate with stale costs as long
//! as `λ·(staleness + 1)` stays small (Fischer & Vöcking, "Adaptive routing with stale
//! information"; `replex-spec.md` §1.5, §3.9).
//!
//! Route lifecycle (§3.6): a new route, or one back from down, warms up with share 0 until
//! it has `min_samples` measurements; exploration then lets it gain traffic if it is
//! cheaper. A route that goes down hands its share to the live routes at once, in
//! proportion to their shares — failover, not load adaptation.
//!
//! [`Buckets`] puts flows on routes (§3.5): a flow hashes to one of `B` buckets and a
//! bucket maps to a route; when shares change only surplus buckets move, and [`Flows`]
//! keeps an existing flow on its route until that route goes down.

use std::collections::HashMap;
use std::hash::Hash;

/// REPLEX parameters (`replex-spec.md` §3.7; `[replex]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Migration rate λ: at most this fraction of the traffic moves per round.
    pub lambda: f64,
    /// Exploration ratio β: how much of the sampling is uniform over the routes.
    pub beta: f64,
    /// Dead band θ in ms: cost differences up to θ move nothing.
    pub theta_ms: f64,
    /// Denominator offset α_off in ms: keeps the relative gain below 1 for tiny costs.
    pub alpha_off_ms: f64,
    /// Loss penalty κ in ms: cost = srtt + κ · loss.
    pub loss_penalty_ms: f64,
    /// Lowest cost in ms.
    pub cost_floor_ms: f64,
    /// Measurements a route needs before it takes part.
    pub min_samples: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params { lambda: 0.1, beta: 0.1, theta_ms: 1.0, alpha_off_ms: 1.0, loss_penalty_ms: 1000.0, cost_floor_ms: 0.1, min_samples: 5 }
    }
}

impl Params {
    /// The cost of a route from its smoothed RTT (ms) and smoothed loss (0..1): `max(floor,
    /// srtt + κ·loss)` (§3.3), non-decreasing and continuous in both.
    pub fn cost(&self, srtt_ms: f64, loss: f64) -> f64 {
        (srtt_ms + self.loss_penalty_ms * loss.clamp(0.0, 1.0)).max(self.cost_floor_ms)
    }
}

/// Where a route stands (§3.3 liveness).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Measured enough and working: takes part in the rounds.
    Live,
    /// New or back from down: share 0 until it has `min_samples` measurements.
    Warming,
    /// Not working: share 0.
    Down,
}

/// One route of a destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Route<K> {
    /// Which route (the direct path, or a relay).
    pub id: K,
    /// Traffic share, 0..1; the live routes' shares sum to 1.
    pub share: f64,
    /// Current cost in ms (see [`Params::cost`]).
    pub cost: f64,
    /// Measurements since it became usable.
    pub samples: u32,
    /// Liveness.
    pub status: Status,
}

/// The routes of one destination and their shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Dest<K> {
    /// The routes.
    pub routes: Vec<Route<K>>,
    /// Rounds run.
    pub rounds: u64,
}

impl<K: Copy + Eq> Default for Dest<K> {
    fn default() -> Self {
        Dest { routes: Vec::new(), rounds: 0 }
    }
}

/// What one measurement says about a route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// Cost in ms, or `None` while nothing is known.
    pub cost: Option<f64>,
    /// Whether the route works.
    pub up: bool,
    /// Measurements so far (probe answers since the route became usable).
    pub samples: u32,
}

impl<K: Copy + Eq> Dest<K> {
    /// A destination whose routes start with equal shares (ECMP's split, where REPLEX
    /// starts, §3.6), all live.
    pub fn equal(ids: &[K], costs: &[f64]) -> Dest<K> {
        let n = ids.len().max(1) as f64;
        Dest { routes: ids.iter().zip(costs).map(|(id, c)| Route { id: *id, share: 1.0 / n, cost: *c, samples: u32::MAX, status: Status::Live }).collect(), rounds: 0 }
    }

    /// A destination with the given shares, all live.
    pub fn with_shares(ids: &[K], shares: &[f64], costs: &[f64]) -> Dest<K> {
        Dest { routes: ids.iter().zip(shares).zip(costs).map(|((id, s), c)| Route { id: *id, share: *s, cost: *c, samples: u32::MAX, status: Status::Live }).collect(), rounds: 0 }
    }

    /// The share of a route (0 for an unknown one).
    pub fn share(&self, id: K) -> f64 {
        self.routes.iter().find(|r| r.id == id).map(|r| r.share).unwrap_or(0.0)
    }

    /// Shares in route order.
    pub fn shares(&self) -> Vec<f64> {
        self.routes.iter().map(|r| r.share).collect()
    }

    fn live_total(&self) -> f64 {
        self.routes.iter().filter(|r| r.status == Status::Live).map(|r| r.share).sum()
    }

    /// Takes in the current measurements of the routes (`measures` names every route the
    /// destination has now; routes not named are removed, new ones added warming). Routes
    /// that went down hand their share to the live ones at once; a destination without any
    /// share gets it all on the first live route (`prefer`, when live, else the cheapest).
    pub fn update(&mut self, measures: &[(K, Measure)], min_samples: u32, prefer: Option<K>) {
        // Drop routes that no longer exist; what they carried goes to the live ones below.
        self.routes.retain(|r| measures.iter().any(|(id, _)| *id == r.id));
        for (id, m) in measures {
            let r = match self.routes.iter_mut().find(|r| r.id == *id) {
                Some(r) => r,
                None => {
                    self.routes.push(Route { id: *id, share: 0.0, cost: m.cost.unwrap_or(f64::MAX), samples: 0, status: Status::Warming });
                    self.routes.last_mut().expect("just pushed")
                }
            };
            r.samples = m.samples;
            if let Some(c) = m.cost {
                r.cost = c;
            }
            let next = if !m.up || m.cost.is_none() {
                Status::Down
            } else if r.status == Status::Live || m.samples >= min_samples {
                Status::Live
            } else {
                Status::Warming
            };
            if next != Status::Live {
                r.share = 0.0;
            }
            r.status = next;
        }
        self.hand_over(prefer);
    }

    /// Gives the traffic of routes that went away or down to the live routes, in
    /// proportion to their shares (all to one route when they have none), so that the
    /// live shares sum to 1.
    fn hand_over(&mut self, prefer: Option<K>) {
        let live: Vec<usize> = (0..self.routes.len()).filter(|&i| self.routes[i].status == Status::Live).collect();
        if live.is_empty() {
            return;
        }
        let total = self.live_total();
        if total <= 1e-12 {
            // Nothing carried yet (or everything went down): start pure on the preferred
            // route if it is live, else on the cheapest.
            let pick = live
                .iter()
                .copied()
                .find(|&i| Some(self.routes[i].id) == prefer)
                .or_else(|| live.iter().copied().min_by(|&a, &b| self.routes[a].cost.total_cmp(&self.routes[b].cost)))
                .expect("live is not empty");
            self.routes[pick].share = 1.0;
            return;
        }
        // Proportional hand-over is the same as renormalising the remaining live shares.
        for &i in &live {
            self.routes[i].share /= total;
        }
    }

    /// Equal shares over the live routes (ECMP's split, the baseline of §3.6), in place of
    /// a round.
    pub fn equalize(&mut self) {
        let n = self.routes.iter().filter(|r| r.status == Status::Live).count();
        for r in self.routes.iter_mut().filter(|r| r.status == Status::Live) {
            r.share = 1.0 / n as f64;
        }
    }

    /// One REPLEX round (§3.4): the Jacobi update of the live routes' shares from a
    /// snapshot of shares and costs. Returns the fraction of traffic moved (½Σ|Δs| ≤ λ).
    pub fn round(&mut self, p: &Params) -> f64 {
        let live: Vec<usize> = (0..self.routes.len()).filter(|&i| self.routes[i].status == Status::Live).collect();
        let n = live.len();
        if n <= 1 {
            return 0.0;
        }
        let s0: Vec<f64> = live.iter().map(|&i| self.routes[i].share).collect();
        let l: Vec<f64> = live.iter().map(|&i| self.routes[i].cost).collect();
        let delta = transfers(&s0, &l, p);
        let mut s: Vec<f64> = (0..n).map(|i| (s0[i] + delta[i]).max(0.0)).collect();
        let sum: f64 = s.iter().sum();
        if sum > 0.0 {
            for x in s.iter_mut() {
                *x /= sum;
            }
        }
        let moved = 0.5 * (0..n).map(|i| (s[i] - s0[i]).abs()).sum::<f64>();
        for (k, &i) in live.iter().enumerate() {
            self.routes[i].share = s[k];
        }
        self.rounds += 1;
        moved
    }
}

/// The net transfer into each route for one round (§3.4): route P sends
/// `s_P · σ_PQ · μ_PQ` to every route Q that is cheaper by more than θ, with
/// `σ_PQ = (1−β)·s_Q + β/n` and `μ_PQ = λ·(ℓ_P − ℓ_Q − θ)/(ℓ_P + α_off)`.
pub fn transfers(s0: &[f64], l: &[f64], p: &Params) -> Vec<f64> {
    let n = s0.len();
    let mut delta = vec![0.0; n];
    for a in 0..n {
        for b in 0..n {
            if a == b {
                continue;
            }
            let gain = l[a] - l[b] - p.theta_ms;
            if gain <= 0.0 || !gain.is_finite() {
                continue;
            }
            let sigma = (1.0 - p.beta) * s0[b] + p.beta / n as f64;
            let mu = (p.lambda * gain / (l[a] + p.alpha_off_ms)).min(p.lambda);
            let f = s0[a] * sigma * mu;
            delta[a] -= f;
            delta[b] += f;
        }
    }
    delta
}

/// The Beckmann potential Φ(s) = Σ ∫₀^{s_i} ℓ_i(u) du for costs `ℓ_i(s) = a_i + b_i·s`
/// (the Lyapunov function of the convergence proofs, §1.1); for tests and benchmarks.
pub fn potential_linear(s: &[f64], a: &[f64], b: &[f64]) -> f64 {
    s.iter().zip(a.iter().zip(b)).map(|(s, (a, b))| a * s + 0.5 * b * s * s).sum()
}

/// Default number of buckets of a userspace split.
pub const BUCKETS: usize = 4096;

/// A sticky bucket table (§3.5): bucket → route index, with quotas from the shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    map: Vec<u8>,
}

impl Buckets {
    /// A table of `n` buckets, all on route 0.
    pub fn new(n: usize) -> Buckets {
        Buckets { map: vec![0; n.max(1)] }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty (never).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The route of a flow hash.
    pub fn route(&self, hash: u64) -> usize {
        usize::from(self.map[(hash % self.map.len() as u64) as usize])
    }

    /// Buckets per route.
    pub fn counts(&self, routes: usize) -> Vec<usize> {
        let mut c = vec![0; routes];
        for b in &self.map {
            if let Some(x) = c.get_mut(usize::from(*b)) {
                *x += 1;
            }
        }
        c
    }

    /// Quotas for `shares` (at most 255 routes): `floor(s_i·B)` plus one for the largest
    /// remainders, so that they sum to B and `|q_i/B − s_i| ≤ 1/B`.
    pub fn quotas(shares: &[f64], b: usize) -> Vec<usize> {
        let total: f64 = shares.iter().map(|s| s.max(0.0)).sum();
        if total <= 0.0 || shares.is_empty() {
            let mut q = vec![0; shares.len()];
            if let Some(x) = q.first_mut() {
                *x = b;
            }
            return q;
        }
        let exact: Vec<f64> = shares.iter().map(|s| s.max(0.0) / total * b as f64).collect();
        let mut q: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
        let mut left = b - q.iter().sum::<usize>();
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|&x, &y| (exact[y] - exact[y].floor()).total_cmp(&(exact[x] - exact[x].floor())).then(x.cmp(&y)));
        for i in order {
            if left == 0 {
                break;
            }
            q[i] += 1;
            left -= 1;
        }
        q
    }

    /// Moves buckets so that each route gets its quota for `shares`, moving only surplus
    /// buckets (the highest-numbered ones of a route over its quota) to routes under it.
    /// Returns how many buckets moved.
    pub fn rebalance(&mut self, shares: &[f64]) -> usize {
        let n = shares.len().min(255);
        let q = Self::quotas(&shares[..n], self.map.len());
        let mut have = self.counts(n.max(1));
        // Buckets on routes that no longer exist count as surplus.
        let mut free: Vec<usize> = (0..self.map.len()).filter(|&i| usize::from(self.map[i]) >= n).collect();
        for r in 0..n {
            let mut excess = have[r].saturating_sub(q[r]);
            for i in (0..self.map.len()).rev() {
                if excess == 0 {
                    break;
                }
                if usize::from(self.map[i]) == r {
                    free.push(i);
                    excess -= 1;
                    have[r] -= 1;
                }
            }
        }
        free.sort_unstable();
        let moved = free.len();
        let mut it = free.into_iter();
        for r in 0..n {
            while have[r] < q[r] {
                let Some(i) = it.next() else { break };
                self.map[i] = r as u8;
                have[r] += 1;
            }
        }
        moved
    }
}

/// Flows pinned to routes: a flow keeps the route it started on until the route goes away
/// or the flow is idle for `idle` (in the caller's time unit).
#[derive(Debug, Clone)]
pub struct Flows<F: Hash + Eq, K> {
    map: HashMap<F, (K, u64)>,
    idle: u64,
    max: usize,
}

impl<F: Hash + Eq + Clone, K: Copy + Eq> Flows<F, K> {
    /// A flow table that forgets flows idle for `idle` and holds at most `max` flows.
    pub fn new(idle: u64, max: usize) -> Flows<F, K> {
        Flows { map: HashMap::new(), idle, max }
    }

    /// The route of `flow` at `now`: the one it was pinned to if that is still `usable`,
    /// else `fresh` (which pins it).
    pub fn route(&mut self, flow: &F, now: u64, usable: impl Fn(K) -> bool, fresh: impl FnOnce() -> K) -> K {
        if let Some((k, seen)) = self.map.get_mut(flow) {
            if usable(*k) && now.saturating_sub(*seen) < self.idle {
                *seen = now;
                return *k;
            }
        }
        if self.map.len() >= self.max {
            let idle = self.idle;
            self.map.retain(|_, (_, seen)| now.saturating_sub(*seen) < idle);
            if self.map.len() >= self.max {
                self.map.clear();
            }
        }
        let k = fresh();
        self.map.insert(flow.clone(), (k, now));
        k
    }

    /// Number of flows held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets the flows of a route (it went away).
    pub fn forget_route(&mut self, k: K) {
        self.map.retain(|_, (r, _)| *r != k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Linear costs ℓ_i(s) = a_i + b_i·s_i (§3.9).
    struct Scenario {
        a: Vec<f64>,
        b: Vec<f64>,
        we: Vec<f64>,
    }

    fn s2() -> Scenario {
        Scenario { a: vec![10.0, 20.0], b: vec![20.0, 20.0], we: vec![0.75, 0.25] }
    }
    fn s3() -> Scenario {
        Scenario { a: vec![10.0, 18.0, 20.0], b: vec![40.0, 40.0, 50.0], we: vec![0.5, 0.3, 0.2] }
    }
    fn s4() -> Scenario {
        Scenario { a: vec![10.0, 18.0, 20.0, 35.0], b: vec![40.0, 40.0, 50.0, 10.0], we: vec![0.5, 0.3, 0.2, 0.0] }
    }

    fn costs(sc: &Scenario, s: &[f64]) -> Vec<f64> {
        sc.a.iter().zip(&sc.b).zip(s).map(|((a, b), s)| a + b * s).collect()
    }

    /// The reference recurrence of §3.9: λ = 0.1, β = 0.1, θ = 0, α_off = 0, costs from
    /// the shares `k` rounds ago. Returns the share trajectory.
    fn run(sc: &Scenario, start: &[f64], p: &Params, k: usize, rounds: usize) -> Vec<Vec<f64>> {
        let ids: Vec<usize> = (0..start.len()).collect();
        let mut d = Dest::with_shares(&ids, start, &costs(sc, start));
        let mut hist = vec![start.to_vec()];
        for t in 0..rounds {
            let old = &hist[t.saturating_sub(k).min(hist.len() - 1)];
            let c = costs(sc, old);
            for (r, c) in d.routes.iter_mut().zip(c) {
                r.cost = c;
            }
            d.round(p);
            hist.push(d.shares());
        }
        hist
    }

    fn reference() -> Params {
        Params { lambda: 0.1, beta: 0.1, theta_ms: 0.0, alpha_off_ms: 0.0, ..Params::default() }
    }

    /// First round after which every later round is within `tol` of the equilibrium.
    fn rounds_to(h: &[Vec<f64>], we: &[f64], tol: f64) -> Option<usize> {
        let ok: Vec<bool> = h.iter().map(|s| s.iter().zip(we).all(|(x, y)| (x - y).abs() < tol)).collect();
        let last_bad = ok.iter().rposition(|o| !o);
        match last_bad {
            None => Some(0),
            Some(i) if i + 1 < ok.len() => Some(i + 1),
            _ => None,
        }
    }

    fn starts(n: usize) -> [Vec<f64>; 3] {
        let equal = vec![1.0 / n as f64; n];
        let mut first = vec![0.0; n];
        first[0] = 1.0;
        let mut last = vec![0.0; n];
        last[n - 1] = 1.0;
        [equal, first, last]
    }

    #[test]
    fn scenarios_converge_within_the_round_budgets() {
        // Table A of §3.9: (scenario, budgets to 1e-2 and 1e-3 for equal, pure-first, pure-last).
        let table: [(Scenario, [(usize, usize); 3]); 3] = [(s2(), [(130, 230), (180, 270), (200, 300)]), (s3(), [(80, 160), (130, 180), (160, 240)]), (s4(), [(240, 440), (160, 360), (340, 540)])];
        for (sc, budgets) in table {
            for (start, (b2, b3)) in starts(sc.a.len()).iter().zip(budgets) {
                let h = run(&sc, start, &reference(), 0, 4000);
                let r2 = rounds_to(&h, &sc.we, 1e-2).expect("converges to 1e-2");
                let r3 = rounds_to(&h, &sc.we, 1e-3).expect("converges to 1e-3");
                println!("{:?} from {start:?}: {r2} / {r3} rounds", sc.a);
                assert!(r2 <= b2 && r3 <= b3, "{:?} from {start:?}: {r2}/{r3} rounds, budget {b2}/{b3}", sc.a);
            }
        }
    }

    #[test]
    fn stale_costs_with_small_steps_do_not_oscillate() {
        // Table C / invariant 9: λ = 0.1 with staleness up to 4 rounds changes direction at
        // most twice per route.
        for sc in [s2(), s3()] {
            for k in [0, 1, 2, 4] {
                let h = run(&sc, &starts(sc.a.len())[0], &reference(), k, 3000);
                for r in 0..sc.a.len() {
                    let changes = direction_changes(&h.iter().map(|s| s[r]).collect::<Vec<_>>());
                    assert!(changes <= 2, "{:?} k={k} route {r}: {changes} direction changes", sc.a);
                }
            }
        }
    }

    fn direction_changes(v: &[f64]) -> usize {
        let mut last = 0i8;
        let mut n = 0;
        for w in v.windows(2) {
            let d = w[1] - w[0];
            let s = if d > 1e-12 {
                1
            } else if d < -1e-12 {
                -1
            } else {
                0
            };
            if s != 0 {
                if last != 0 && s != last {
                    n += 1;
                }
                last = s;
            }
        }
        n
    }

    #[test]
    fn negative_control_moving_everything_oscillates() {
        // Best response: all traffic to the cheapest route, every round (S2).
        let sc = s2();
        let mut s = vec![0.5, 0.5];
        let mut seen = Vec::new();
        for _ in 0..20 {
            let c = costs(&sc, &s);
            s = if c[0] <= c[1] { vec![1.0, 0.0] } else { vec![0.0, 1.0] };
            seen.push(s.clone());
        }
        assert!(seen.windows(2).all(|w| w[0] != w[1]), "best response alternates forever: {seen:?}");
        assert!(rounds_to(&seen, &sc.we, 1e-2).is_none());
    }

    #[test]
    fn negative_control_no_exploration_stays_stuck() {
        let sc = s3();
        let p = Params { beta: 0.0, ..reference() };
        let h = run(&sc, &[1.0, 0.0, 0.0], &p, 0, 3000);
        assert_eq!(h.last().unwrap(), &vec![1.0, 0.0, 0.0], "a pure start without exploration never finds the other routes");
    }

    #[test]
    fn negative_control_large_steps_with_stale_costs_oscillate() {
        let sc = s3();
        let p = Params { lambda: 1.0, ..reference() };
        let h = run(&sc, &starts(3)[0], &p, 4, 3000);
        let tail: Vec<f64> = h[2500..].iter().map(|s| s[0]).collect();
        let amp = tail.iter().cloned().fold(f64::MIN, f64::max) - tail.iter().cloned().fold(f64::MAX, f64::min);
        assert!(amp > 0.3, "expected a persistent oscillation, amplitude {amp}");
        assert!(rounds_to(&h, &sc.we, 1e-3).is_none());
    }

    #[test]
    fn static_costs_drain_the_expensive_route() {
        // Invariant 7: costs (30, 30, 40) from equal shares.
        let p = reference();
        let mut d = Dest::equal(&[0, 1, 2], &[30.0, 30.0, 40.0]);
        let mut last = d.share(2);
        for t in 1..=320 {
            d.round(&p);
            assert!(d.share(2) <= last + 1e-15);
            assert!((d.share(0) - d.share(1)).abs() < 1e-12);
            last = d.share(2);
            if t == 200 {
                assert!(last < 1e-2);
            }
        }
        assert!(last < 1e-3);
    }

    #[test]
    fn the_equilibrium_is_a_fixed_point() {
        for sc in [s2(), s3()] {
            let ids: Vec<usize> = (0..sc.we.len()).collect();
            let mut d = Dest::with_shares(&ids, &sc.we, &costs(&sc, &sc.we));
            d.round(&reference());
            for (x, y) in d.shares().iter().zip(&sc.we) {
                assert!((x - y).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn lifecycle_warm_up_and_failover() {
        let p = Params::default();
        let m = |cost: f64, up: bool, samples: u32| Measure { cost: Some(cost), up, samples };
        let mut d: Dest<u8> = Dest::default();
        // The first route carries everything as soon as it is live.
        d.update(&[(0, m(10.0, true, 9))], p.min_samples, Some(0));
        assert_eq!(d.shares(), vec![1.0]);
        // A new route warms up at share 0, then gains traffic only through rounds.
        d.update(&[(0, m(30.0, true, 20)), (1, m(5.0, true, 2))], p.min_samples, Some(0));
        assert_eq!(d.routes[1].status, Status::Warming);
        d.round(&p);
        assert_eq!(d.share(1), 0.0);
        d.update(&[(0, m(30.0, true, 21)), (1, m(5.0, true, 6))], p.min_samples, Some(0));
        assert_eq!(d.routes[1].status, Status::Live);
        for _ in 0..10 {
            d.round(&p);
        }
        let s1 = d.share(1);
        assert!(s1 > 0.0 && s1 < 0.9, "{s1}");
        // The direct route goes down: its share moves at once.
        d.update(&[(0, Measure { cost: Some(30.0), up: false, samples: 21 }), (1, m(5.0, true, 7))], p.min_samples, Some(0));
        assert_eq!(d.share(0), 0.0);
        assert!((d.share(1) - 1.0).abs() < 1e-12);
        // It comes back: warming again, no share.
        d.update(&[(0, m(30.0, true, 1)), (1, m(5.0, true, 8))], p.min_samples, Some(0));
        assert_eq!(d.routes[0].status, Status::Warming);
        assert_eq!(d.share(0), 0.0);
        // A relay disappears altogether: its share goes to the others.
        d.update(&[(0, m(30.0, true, 9))], p.min_samples, Some(0));
        assert_eq!(d.shares(), vec![1.0]);
    }

    #[test]
    fn equal_mode_splits_evenly_over_live_routes_only() {
        let p = Params::default();
        let m = |up: bool, samples: u32| Measure { cost: Some(10.0), up, samples };
        let mut d: Dest<u8> = Dest::default();
        d.update(&[(0, m(true, 9)), (1, m(true, 9)), (2, m(true, 1))], p.min_samples, Some(0));
        d.equalize();
        assert_eq!(d.shares(), vec![0.5, 0.5, 0.0]);
        d.update(&[(0, m(false, 9)), (1, m(true, 9)), (2, m(true, 9))], p.min_samples, Some(0));
        d.equalize();
        assert_eq!(d.shares(), vec![0.0, 0.5, 0.5]);
    }

    #[test]
    fn buckets_follow_quotas_and_move_only_the_surplus() {
        let mut b = Buckets::new(BUCKETS);
        assert_eq!(b.rebalance(&[0.7, 0.3]), (0.3 * BUCKETS as f64).round() as usize);
        let c = b.counts(2);
        assert!((c[0] as f64 / BUCKETS as f64 - 0.7).abs() <= 1.0 / BUCKETS as f64);
        let before = b.clone();
        let moved = b.rebalance(&[0.6, 0.3, 0.1]);
        // only the new route's quota moved, taken from route 0's surplus
        assert_eq!(moved, Buckets::quotas(&[0.6, 0.3, 0.1], BUCKETS)[2]);
        let changed = (0..BUCKETS).filter(|&i| before.map[i] != b.map[i]).count();
        assert_eq!(changed, moved);
        assert!((0..BUCKETS).all(|i| before.map[i] != 1 || b.map[i] == 1), "route 1 kept its buckets");
        // a route removed hands its buckets over
        b.rebalance(&[0.5, 0.5]);
        assert_eq!(b.counts(3)[2], 0);
    }

    #[test]
    fn flows_stay_on_their_route_until_it_goes_away() {
        let mut f: Flows<u32, u8> = Flows::new(120, 1000);
        let mut b = Buckets::new(64);
        b.rebalance(&[0.5, 0.5]);
        let first: Vec<u8> = (0..50u32).map(|flow| f.route(&flow, 0, |_| true, || b.route(u64::from(flow) * 2654435761) as u8)).collect();
        let mut rng = 7u64;
        for t in 1..100u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let x = (rng % 1000) as f64 / 1000.0;
            b.rebalance(&[x, 1.0 - x]);
            for flow in 0..50u32 {
                let r = f.route(&flow, t, |_| true, || b.route(u64::from(flow)) as u8);
                assert_eq!(r, first[flow as usize], "flow {flow} moved at update {t}");
            }
        }
        // route 1 goes down: its flows move, the others stay
        for flow in 0..50u32 {
            let r = f.route(&flow, 200, |k| k != 1, || 0);
            if first[flow as usize] == 1 {
                assert_eq!(r, 0);
            } else {
                assert_eq!(r, first[flow as usize]);
            }
        }
    }

    fn arb_dest() -> impl Strategy<Value = (Vec<f64>, Vec<f64>)> {
        (2usize..6).prop_flat_map(|n| (proptest::collection::vec(0.0f64..1.0, n), proptest::collection::vec(0.1f64..500.0, n)))
    }

    proptest! {
        /// Invariants 1–4 of §3.8 for any shares, costs and parameters.
        #[test]
        fn a_round_keeps_the_invariants((raw, cost) in arb_dest(), lambda in 0.01f64..1.0, beta in 0.0f64..1.0, theta in 0.0f64..5.0) {
            let sum: f64 = raw.iter().sum::<f64>().max(1e-9);
            let s: Vec<f64> = raw.iter().map(|x| x / sum).collect();
            let p = Params { lambda, beta, theta_ms: theta, alpha_off_ms: 1.0, ..Params::default() };
            let ids: Vec<usize> = (0..s.len()).collect();
            let mut d = Dest::with_shares(&ids, &s, &cost);
            let delta = transfers(&s, &cost, &p);
            let moved = d.round(&p);
            let after = d.shares();
            // non-negative, summing to 1
            prop_assert!(after.iter().all(|x| *x >= 0.0));
            prop_assert!((after.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            // no route loses more than λ of its share; at most λ moves in all
            for i in 0..s.len() {
                prop_assert!(after[i] >= (1.0 - lambda) * s[i] - 1e-12, "route {} lost more than λ", i);
            }
            prop_assert!(moved <= lambda + 1e-12);
            // only downhill: a route gains only from routes costlier by more than θ, and
            // loses only to routes cheaper by more than θ
            for i in 0..s.len() {
                let cheaper_exists = (0..s.len()).any(|j| cost[j] < cost[i] - theta);
                let dearer_exists = (0..s.len()).any(|j| cost[j] > cost[i] + theta && s[j] > 0.0);
                if delta[i] < -1e-15 { prop_assert!(cheaper_exists); }
                if delta[i] > 1e-15 { prop_assert!(dearer_exists); }
            }
        }

        /// Invariant 6: with fresh costs the potential never increases (S2–S4, any start).
        #[test]
        fn the_potential_never_increases(which in 0usize..3, raw in proptest::collection::vec(0.0f64..1.0, 4), lambda in 0.05f64..0.5, explore in any::<bool>()) {
            let sc = [s2(), s3(), s4()][which].clone_s();
            let n = sc.a.len();
            let sum: f64 = raw[..n].iter().sum::<f64>().max(1e-9);
            let start: Vec<f64> = raw[..n].iter().map(|x| x / sum).collect();
            let p = Params { lambda, beta: if explore { 0.1 } else { 0.0 }, theta_ms: 0.0, alpha_off_ms: 0.0, ..Params::default() };
            let h = run(&sc, &start, &p, 0, 300);
            for w in h.windows(2) {
                prop_assert!(potential_linear(&w[1], &sc.a, &sc.b) <= potential_linear(&w[0], &sc.a, &sc.b) + 1e-12);
            }
        }

        /// Invariant 12: quotas match shares within one bucket.
        #[test]
        fn quotas_match_shares(raw in proptest::collection::vec(0.0f64..1.0, 1..8)) {
            let sum: f64 = raw.iter().sum::<f64>();
            prop_assume!(sum > 1e-6);
            let s: Vec<f64> = raw.iter().map(|x| x / sum).collect();
            let q = Buckets::quotas(&s, BUCKETS);
            prop_assert_eq!(q.iter().sum::<usize>(), BUCKETS);
            for (qi, si) in q.iter().zip(&s) {
                prop_assert!((*qi as f64 / BUCKETS as f64 - si).abs() <= 1.0 / BUCKETS as f64 + 1e-12);
            }
            let mut b = Buckets::new(BUCKETS);
            b.rebalance(&s);
            prop_assert_eq!(b.counts(s.len()), q);
        }
    }

    impl Scenario {
        fn clone_s(&self) -> Scenario {
            Scenario { a: self.a.clone(), b: self.b.clone(), we: self.we.clone() }
        }
    }
}
