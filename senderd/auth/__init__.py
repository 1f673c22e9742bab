"""Authentication: service keys (`servicekey`), TLS contexts (`tls`), tokens kept fresh (`token`) and
credentials rotated without a restart (`rotation`)."""
