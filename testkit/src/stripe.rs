//! A Stripe-compatible HTTP server for tests (the routes async-stripe calls).
