# Simulated STM32 targets on the local Debian base (a station's fixtures in the compose scenario).
FROM flashgate-base:bookworm
COPY flashgate /usr/local/bin/flashgate
WORKDIR /var/lib/flashgate-sim
ENTRYPOINT ["/usr/local/bin/flashgate"]
CMD ["sim", "--targets", "4", "--listen", "0.0.0.0:7000", "--vendor-ca", "/etc/flashgate/vendor/vendor-ca.key"]
