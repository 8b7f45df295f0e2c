"""The transparent front: DNS46, the fake-IP pool's interception, and what it installs."""
