"""Passkeys and security keys (WebAuthn) as a step-up factor: see docs/passkeys.md."""
