//! What can go wrong talking to a guest agent.

use std::time::Duration;

/// Why a guest-agent command did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing (or nothing usable) answered in time; the channel is resynchronised before the
    /// next command.
    #[error("the guest agent did not answer {command} within {waited:?}")]
    Timeout {
        /// The command.
        command: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The agent does not know the command (`CommandNotFound`).
    #[error("the guest agent does not support {command}: {desc}")]
    CommandNotFound {
        /// The command.
        command: String,
        /// The agent's words.
        desc: String,
    },
    /// The agent ran the command and it failed (`GenericError` and other classes).
    #[error("the guest agent failed {command}: {class}: {desc}")]
    CommandFailed {
        /// The command.
        command: String,
        /// The error class (`GenericError`, …).
        class: String,
        /// The agent's words.
        desc: String,
    },
    /// The agent answered something the command cannot return.
    #[error("unexpected answer to {command}: {answer}")]
    UnexpectedAnswer {
        /// The command.
        command: String,
        /// What came back.
        answer: String,
    },
    /// The channel is gone (the guest stopped, the socket closed).
    #[error("the guest agent channel is closed")]
    Closed,
    /// Reading or writing the channel failed.
    #[error("guest agent channel i/o")]
    Io(#[source] std::io::Error),
}
