//! Which topic a pipeline writes: a topic deleted and created again under `spec.kafka.topic`'s
//! name has a new topic id (KIP-516) and its offsets count other records, so neither the
//! group's committed offsets, nor the blocks in the output, nor the jobs planned before are
//! its own. Pure decisions; the reconcile acts on them.

use blocksmith_crds::pipeline::TopicIdentity;

/// What was recorded of the topic before this pass: the pipeline's status, and the ids and
/// outputs its live jobs were planned with.
pub struct Recorded<'a> {
    pub status: Option<&'a TopicIdentity>,
    /// Each live job's topic id (when it recorded one) and output URL, for the jobs of the
    /// topic's name.
    pub jobs: Vec<(Option<&'a str>, &'a str)>,
}

/// The outcome of [`check`].
#[derive(Debug, PartialEq, Eq)]
pub struct TopicCheck {
    /// What the status records from now on.
    pub identity: Option<TopicIdentity>,
    /// Why nothing may be planned or committed, for the `TopicRecreated` condition.
    pub recreated: Option<String>,
}

/// Judges the topic's id as the brokers now report it (`live`; `None` where they report none)
/// against what was recorded. A new id is taken on only once `spec.output.url` (`output_url`)
/// names an output that holds no block of the old one, and no job of the old one is left.
pub fn check(recorded: &Recorded, live: Option<&str>, topic: &str, output_url: &str) -> TopicCheck {
    let Some(live) = live else {
        return TopicCheck {
            identity: recorded.status.cloned(),
            recreated: None,
        };
    };
    // Another topic name is another topic, whose blocks have other keys.
    let recorded_elsewhere = recorded.status.filter(|r| r.name == topic && r.id != live);
    let mut old_in_output: Vec<&str> = recorded_elsewhere
        .filter(|r| r.output_url == output_url)
        .map(|r| r.id.as_str())
        .into_iter()
        .collect();
    let mut old_jobs = 0;
    for &(id, url) in &recorded.jobs {
        if let Some(id) = id.filter(|id| *id != live) {
            old_jobs += 1;
            if url == output_url {
                old_in_output.push(id);
            }
        }
    }
    old_in_output.sort_unstable();
    old_in_output.dedup();
    let adopted = TopicIdentity {
        name: topic.to_owned(),
        id: live.to_owned(),
        output_url: output_url.to_owned(),
    };
    if old_in_output.is_empty() && old_jobs == 0 {
        return TopicCheck {
            identity: Some(adopted),
            recreated: None,
        };
    }
    let old = recorded_elsewhere
        .map(|r| r.id.as_str())
        .or(old_in_output.first().copied())
        .or(recorded
            .jobs
            .iter()
            .find_map(|(id, _)| id.filter(|id| *id != live)))
        .unwrap_or_default();
    let mut message = format!(
        "topic {topic:?} was deleted and created again: its id is now {live:?}, the committed \
         offsets and blocks so far are of topic id {old:?}, and the same offsets count other \
         records now. Nothing is planned or committed until this is resolved:"
    );
    let mut step = 0;
    let mut next = |text: String| {
        step += 1;
        message.push_str(&format!(" {step}) {text}"));
    };
    if !old_in_output.is_empty() {
        next(format!(
            "reset the consumer group's offsets for the new topic (e.g. kafka-consumer-groups \
             --reset-offsets --to-earliest --topic {topic}), then set spec.output.url to a new \
             location ({output_url} holds the old topic's blocks under the same keys);"
        ));
    }
    if old_jobs > 0 {
        next(format!(
            "delete the {old_jobs} job(s) of the old topic (kubectl delete blockjobs with \
             spec.kafkaTopicId {old:?}); their records went with it;"
        ));
    }
    message.pop();
    message.push('.');
    TopicCheck {
        identity: if old_in_output.is_empty() {
            Some(adopted)
        } else {
            recorded.status.cloned()
        },
        recreated: Some(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(id: &str, url: &str) -> TopicIdentity {
        TopicIdentity {
            name: "t".into(),
            id: id.into(),
            output_url: url.into(),
        }
    }

    fn recorded<'a>(
        status: Option<&'a TopicIdentity>,
        jobs: &[(Option<&'a str>, &'a str)],
    ) -> Recorded<'a> {
        Recorded {
            status,
            jobs: jobs.to_vec(),
        }
    }

    #[test]
    fn the_first_id_seen_is_recorded_and_an_unreported_one_changes_nothing() {
        let first = check(&recorded(None, &[]), Some("A"), "t", "s3://b/out");
        assert_eq!(first.identity, Some(identity("A", "s3://b/out")));
        assert_eq!(first.recreated, None);
        let known = identity("A", "s3://b/out");
        let silent = check(&recorded(Some(&known), &[]), None, "t", "s3://b/out");
        assert_eq!(silent.identity, Some(known));
        assert_eq!(silent.recreated, None);
    }

    #[test]
    fn another_topic_name_is_another_topic() {
        let known = identity("A", "s3://b/out");
        let renamed = check(&recorded(Some(&known), &[]), Some("B"), "u", "s3://b/out");
        assert_eq!(renamed.recreated, None);
        assert_eq!(
            renamed.identity,
            Some(TopicIdentity {
                name: "u".into(),
                ..identity("B", "s3://b/out")
            })
        );
    }

    #[test]
    fn the_same_id_follows_the_output_url() {
        let known = identity("A", "s3://b/out");
        let moved = check(
            &recorded(Some(&known), &[(Some("A"), "s3://b/out")]),
            Some("A"),
            "t",
            "s3://b/new",
        );
        assert_eq!(moved.identity, Some(identity("A", "s3://b/new")));
        assert_eq!(moved.recreated, None);
    }

    #[test]
    fn a_new_id_over_the_same_output_halts_naming_both_ids_and_what_to_do() {
        let known = TopicIdentity {
            name: "orders".into(),
            ..identity("A", "s3://b/out")
        };
        let c = check(
            &recorded(Some(&known), &[]),
            Some("B"),
            "orders",
            "s3://b/out",
        );
        assert_eq!(c.identity, Some(known), "the old identity is kept");
        let message = c.recreated.unwrap();
        for part in [
            "topic \"orders\" was deleted and created again",
            "its id is now \"B\"",
            "of topic id \"A\"",
            "1) reset the consumer group's offsets",
            "then set spec.output.url to a new location (s3://b/out holds",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        assert!(!message.contains("2)"), "{message}");
        assert!(message.ends_with('.'), "{message}");
    }

    #[test]
    fn a_new_output_takes_the_new_id_once_no_old_job_is_left() {
        let known = identity("A", "s3://b/out");
        let jobs = [(Some("A"), "s3://b/out"), (Some("A"), "s3://b/out")];
        let left = check(&recorded(Some(&known), &jobs), Some("B"), "t", "s3://b/new");
        assert_eq!(left.identity, Some(identity("B", "s3://b/new")));
        let message = left.recreated.unwrap();
        assert!(
            message.contains("1) delete the 2 job(s) of the old topic"),
            "{message}"
        );
        assert!(!message.contains("reset"), "{message}");

        let done = check(
            &recorded(Some(&identity("B", "s3://b/new")), &[]),
            Some("B"),
            "t",
            "s3://b/new",
        );
        assert_eq!(done.recreated, None);
    }

    #[test]
    fn jobs_of_the_old_id_tell_even_without_a_recorded_status() {
        let c = check(
            &recorded(None, &[(Some("A"), "s3://b/out")]),
            Some("B"),
            "t",
            "s3://b/out",
        );
        assert_eq!(c.identity, None);
        let message = c.recreated.unwrap();
        assert!(message.contains("of topic id \"A\""), "{message}");
        assert!(message.contains("1) reset"), "{message}");
        assert!(message.contains("2) delete the 1 job(s)"), "{message}");
        // Jobs that recorded no id say nothing.
        let quiet = check(
            &recorded(None, &[(None, "s3://b/out")]),
            Some("B"),
            "t",
            "s3://b/out",
        );
        assert_eq!(quiet.recreated, None);
    }
}
