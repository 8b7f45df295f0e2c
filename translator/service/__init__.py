"""Running socks64 as a service: systemd notify and socket activation, privilege drop,
descriptor limits, the status view. Above the gateway; nothing below imports it."""
