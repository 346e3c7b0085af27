//! RFC 6962 / RFC 9162 Merkle tree hashing: roots, inclusion proofs and consistency proofs,
//! and their verification. Leaves are audit-record commitments (leaf hashes).

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// Interior node hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Builds the root incrementally from leaf hashes in order, in O(log n) memory: a stack of
/// perfect-subtree roots (a binary counter), folded right to left at the end.
#[derive(Debug, Clone, Default)]
pub struct RootBuilder {
    /// (height, hash) of perfect subtrees, left to right, heights strictly decreasing.
    stack: Vec<(u32, Hash)>,
    size: u64,
}

impl RootBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut cur = (0u32, leaf);
        while let Some(&(h, left)) = self.stack.last() {
            if h != cur.0 {
                break;
            }
            self.stack.pop();
            cur = (h + 1, node_hash(&left, &cur.1));
        }
        self.stack.push(cur);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RFC 6962 root of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// MTH over a slice of leaf hashes (RFC 6962 §2.1).
pub fn root(leaves: &[Hash]) -> Hash {
    let mut b = RootBuilder::new();
    for l in leaves {
        b.push(*l);
    }
    b.root()
}

fn split(n: usize) -> usize {
    // Largest power of two strictly less than n (n >= 2).
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// Inclusion proof PATH(m, D[n]) (RFC 6962 §2.1.1).
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
        if d.len() <= 1 {
            return;
        }
        let k = split(d.len());
        let (l, r) = d.split_at(k);
        if m < k {
            path(m, l, out);
            out.push(root(r));
        } else {
            path(m - k, r, out);
            out.push(root(l));
        }
    }
    let mut out = vec![];
    path(index, leaves, &mut out);
    Some(out)
}

/// Consistency proof PROOF(m, D[n]) (RFC 6962 §2.1.2), for 0 < m <= n.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    if m == 0 || m > leaves.len() {
        return None;
    }
    fn sub(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
        let n = d.len();
        if m == n {
            if !complete {
                out.push(root(d));
            }
            return;
        }
        let k = split(n);
        let (l, r) = d.split_at(k);
        if m <= k {
            sub(m, l, complete, out);
            out.push(root(r));
        } else {
            sub(m - k, r, false, out);
            out.push(root(l));
        }
    }
    let mut out = vec![];
    sub(m, leaves, true, &mut out);
    Some(out)
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Verifies a consistency proof between two tree heads (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| crate::leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    /// An independent, literal transcription of RFC 6962's recursive MTH.
    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = split(n);
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    #[test]
    fn incremental_root_matches_the_recursive_definition() {
        for n in 0..70 {
            assert_eq!(root(&leaves(n)), mth(&leaves(n)), "n={n}");
        }
    }

    #[test]
    fn rfc6962_known_root() {
        // Empty tree root from RFC 6962 test vectors.
        assert_eq!(
            empty_root()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn inclusion_proofs_verify_and_detect_tampering() {
        for n in 1..40u64 {
            let l = leaves(n as usize);
            let r = root(&l);
            for i in 0..n {
                let p = inclusion_proof(&l, i as usize).unwrap();
                assert!(
                    verify_inclusion(&l[i as usize], i, n, &p, &r),
                    "n={n} i={i}"
                );
                let wrong = crate::leaf_hash(b"forged");
                assert!(!verify_inclusion(&wrong, i, n, &p, &r));
                if n > 1 {
                    assert!(
                        !verify_inclusion(&l[i as usize], (i + 1) % n, n, &p, &r)
                            || l[i as usize] == l[((i + 1) % n) as usize]
                    );
                }
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_and_detect_forks() {
        for n in 1..40usize {
            let l = leaves(n);
            let new_root = root(&l);
            for m in 1..=n {
                let old_root = root(&l[..m]);
                let p = consistency_proof(&l, m).unwrap();
                assert!(
                    verify_consistency(m as u64, n as u64, &old_root, &new_root, &p),
                    "m={m} n={n}"
                );
                // A fork: a different old tree of the same size must not verify.
                let mut forked = l[..m].to_vec();
                forked[m - 1] = crate::leaf_hash(b"rewritten");
                assert!(
                    !verify_consistency(m as u64, n as u64, &root(&forked), &new_root, &p),
                    "m={m} n={n}"
                );
            }
        }
    }
}
