"""abrec: A/B testing and live experiments for session-based recommenders."""
