"""Shared fixtures. The real services (Kafka broker, S3 endpoint) live in tests/harness/."""

pytest_plugins = [
    "tests.harness.kafka",
    "tests.harness.s3",
    "tests.harness.mount",
    "tests.harness.netns",
]
