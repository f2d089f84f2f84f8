#!/bin/sh
# udhcpc hook of the test guest: apply the lease from msbtap's DHCP server.
case "$1" in
  bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do route add default gw "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
exit 0
