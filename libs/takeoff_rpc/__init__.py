"""Client-side plumbing shared by the SDK and every service: channels, retries, error decoding."""
