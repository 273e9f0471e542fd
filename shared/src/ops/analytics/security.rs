//! Security findings and the security score.

use super::HealthParams;
use super::health::Figures;
use super::report::{SecurityAnalysis, SuspiciousSession, UserFinding};

/// The figures the score is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScoreInputs {
    /// Rapidly updated sessions.
    pub suspicious: u64,
    /// Sessions created more than 7 days ago and used within the last hour.
    pub old_active: u64,
    /// Sessions without a platform.
    pub without_platform: u64,
    /// Sessions pointing at a missing platform.
    pub missing_platform: u64,
    /// Users over the concurrent-session limit.
    pub users_over_limit: u64,
    /// Users over the IP-address or user-agent diversity limit (each list counted).
    pub diverse_users: u64,
}

/// The security score, 0–100, with the deductions that made it.
///
/// ```text
/// score = 100
///       − min(10 × suspicious_sessions, 30)        original
///       − min(2 × old_active_sessions, 20)         original
///       − min(sessions_without_platform, 10)       original ("orphaned_platform_sessions")
///       − min(missing_platform_sessions, 10)       new
///       − min(2 × users_over_session_limit, 10)    new
///       − min(2 × (users_with_many_ips + users_with_many_user_agents), 10)   new
/// clamped to 0..=100
/// ```
///
/// The first three terms are the original's (range 40–100); the new ones can take it lower.
/// Figures the schema cannot support count as 0.
pub fn security_score(i: &ScoreInputs) -> (u32, Vec<String>) {
    let terms = [
        ("suspicious sessions", i.suspicious, 10, 30),
        ("old sessions still active", i.old_active, 2, 20),
        ("sessions without a platform", i.without_platform, 1, 10),
        (
            "sessions with a missing platform",
            i.missing_platform,
            1,
            10,
        ),
        (
            "users over the concurrent-session limit",
            i.users_over_limit,
            2,
            10,
        ),
        (
            "users with many IP addresses or user agents",
            i.diverse_users,
            2,
            10,
        ),
    ];
    let mut score: i64 = 100;
    let mut deductions = Vec::new();
    for (what, n, per, cap) in terms {
        let d = n.saturating_mul(per).min(cap) as i64;
        if d > 0 {
            deductions.push(format!("-{d}: {n} {what} (x{per}, at most {cap})"));
        }
        score -= d;
    }
    (score.clamp(0, 100) as u32, deductions)
}

/// Builds the `security_analysis` block.
pub(crate) fn analyse(f: &Figures, p: &HealthParams) -> SecurityAnalysis {
    let finding = |limit: u64, found: &Option<(u64, Vec<super::UserCount>)>| {
        found.as_ref().map(|(count, examples)| UserFinding {
            limit,
            count: *count,
            examples: examples.clone(),
        })
    };
    let many_ips = finding(p.ip_diversity_limit, &f.many_ips);
    let many_agents = finding(p.user_agent_diversity_limit, &f.many_agents);
    let inputs = ScoreInputs {
        suspicious: f.suspicious_count,
        old_active: f.old_active,
        without_platform: f.without_platform.unwrap_or(0),
        missing_platform: f.missing_platform.unwrap_or(0),
        users_over_limit: f.users_over_limit,
        diverse_users: many_ips.as_ref().map_or(0, |u| u.count)
            + many_agents.as_ref().map_or(0, |u| u.count),
    };
    let (security_score, score_deductions) = security_score(&inputs);
    SecurityAnalysis {
        suspicious_sessions: f
            .suspicious
            .iter()
            .map(|(key, user_id, gap)| SuspiciousSession {
                session_id: format!("{}...", key.chars().take(8).collect::<String>()),
                user_id: *user_id,
                reason: "rapid_updates".into(),
                update_frequency_seconds: *gap,
            })
            .collect(),
        suspicious_session_count: f.suspicious_count,
        old_active_sessions: f.old_active,
        orphaned_platform_sessions: f.without_platform,
        missing_platform_sessions: f.missing_platform,
        users_over_session_limit: UserFinding {
            limit: p.concurrent_session_limit,
            count: f.users_over_limit,
            examples: f.users_over_limit_examples.clone(),
        },
        users_with_many_ips: many_ips,
        users_with_many_user_agents: many_agents,
        security_score,
        score_deductions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_terms_keep_their_caps() {
        let (s, _) = security_score(&ScoreInputs {
            suspicious: 1,
            old_active: 3,
            without_platform: 4,
            ..Default::default()
        });
        assert_eq!(s, 100 - 10 - 6 - 4);
        let (s, _) = security_score(&ScoreInputs {
            suspicious: 99,
            old_active: 99,
            without_platform: 99,
            ..Default::default()
        });
        assert_eq!(s, 40);
        let all = ScoreInputs {
            suspicious: 99,
            old_active: 99,
            without_platform: 99,
            missing_platform: 99,
            users_over_limit: 99,
            diverse_users: 99,
        };
        assert_eq!(security_score(&all).0, 10);
    }
}
