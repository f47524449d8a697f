//! The iptables rules Docker's libnetwork (bridge driver, iptables backend, userland proxy
//! irrelevant here since clients are remote) installs for a bridge network and for each
//! published port, as iptables-restore input.

use std::fmt::Write;

use super::PortMap;

/// Both tables, complete (for a plain `iptables-restore`): the chains and jumps Docker sets
/// up for the bridge `br` with `subnet`, plus the per-port rules of `containers` in order.
pub fn ruleset(br: &str, subnet: &str, containers: &[(&str, &[PortMap])]) -> String {
    let mut nat = String::new();
    let mut nat_post = String::new();
    let mut filter = String::new();
    for (ip, maps) in containers {
        for m in maps.iter() {
            port_rules('A', br, ip, m, &mut nat, &mut nat_post, &mut filter);
        }
    }
    format!(
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :INPUT ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n\
         -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A POSTROUTING -s {subnet} ! -o {br} -j MASQUERADE\n\
         {nat_post}\
         -A DOCKER -i {br} -j RETURN\n\
         {nat}\
         COMMIT\n\
         *filter\n\
         :INPUT ACCEPT [0:0]\n\
         :FORWARD DROP [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n\
         :DOCKER-ISOLATION-STAGE-1 - [0:0]\n\
         :DOCKER-ISOLATION-STAGE-2 - [0:0]\n\
         :DOCKER-USER - [0:0]\n\
         -A FORWARD -j DOCKER-USER\n\
         -A FORWARD -j DOCKER-ISOLATION-STAGE-1\n\
         -A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FORWARD -o {br} -j DOCKER\n\
         -A FORWARD -i {br} ! -o {br} -j ACCEPT\n\
         -A FORWARD -i {br} -o {br} -j ACCEPT\n\
         {filter}\
         -A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2\n\
         -A DOCKER-ISOLATION-STAGE-1 -j RETURN\n\
         -A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP\n\
         -A DOCKER-ISOLATION-STAGE-2 -j RETURN\n\
         -A DOCKER-USER -j RETURN\n\
         COMMIT\n"
    )
}

/// Adds (`op` = 'A') or deletes ('D') one container's port rules, for `iptables-restore --noflush`.
pub fn container_delta(op: char, br: &str, ip: &str, maps: &[PortMap]) -> String {
    let (mut nat, mut nat_post, mut filter) = (String::new(), String::new(), String::new());
    for m in maps {
        port_rules(op, br, ip, m, &mut nat, &mut nat_post, &mut filter);
    }
    format!("*nat\n{nat_post}{nat}COMMIT\n*filter\n{filter}COMMIT\n")
}

/// What `docker run -p HOST:CTR/proto` adds: DNAT in nat/DOCKER, hairpin MASQUERADE in
/// POSTROUTING, ACCEPT in filter/DOCKER.
fn port_rules(op: char, br: &str, ip: &str, m: &PortMap, nat: &mut String, post: &mut String, filter: &mut String) {
    let p = m.proto.as_str();
    let (h, c) = (m.host, m.ctr);
    let _ = writeln!(post, "-{op} POSTROUTING -s {ip}/32 -d {ip}/32 -p {p} -m {p} --dport {c} -j MASQUERADE");
    let _ = writeln!(nat, "-{op} DOCKER ! -i {br} -p {p} -m {p} --dport {h} -j DNAT --to-destination {ip}:{c}");
    let _ = writeln!(filter, "-{op} DOCKER -d {ip}/32 ! -i {br} -o {br} -p {p} -m {p} --dport {c} -j ACCEPT");
}

#[cfg(test)]
mod tests {
    use super::super::Proto;
    use super::*;

    #[test]
    fn rules_for_one_port() {
        let m = [PortMap { host: 8080, ctr: 80, proto: Proto::Tcp }];
        let r = ruleset("br0", "203.0.113.0/24", &[("203.0.113.2", &m)]);
        assert!(r.contains("-A DOCKER ! -i br0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 203.0.113.2:80\n"));
        assert!(r.contains("-A DOCKER -d 203.0.113.2/32 ! -i br0 -o br0 -p tcp -m tcp --dport 80 -j ACCEPT\n"));
        assert!(r.contains("-A POSTROUTING -s 203.0.113.0/24 ! -o br0 -j MASQUERADE\n"));
        assert_eq!(r.matches("COMMIT").count(), 2);
        // The per-port DNAT comes after the RETURN for traffic from the bridge itself.
        assert!(r.find("-A DOCKER -i br0 -j RETURN").unwrap() < r.find("DNAT").unwrap());
    }

    #[test]
    fn delta_adds_and_deletes_the_same_rules() {
        let m = [PortMap { host: 5201, ctr: 5201, proto: Proto::Udp }];
        let add = container_delta('A', "br0", "203.0.113.9", &m);
        let del = container_delta('D', "br0", "203.0.113.9", &m);
        assert_eq!(add.replace("-A ", "-D "), del);
        assert_eq!(add.lines().filter(|l| l.starts_with("-A")).count(), 3);
        assert!(add.contains("-p udp -m udp --dport 5201"));
    }
}
