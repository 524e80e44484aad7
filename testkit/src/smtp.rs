//! A local SMTP server for tests: receives real SMTP and keeps each message.
