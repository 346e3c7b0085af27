//! Property-based fuzzing of what the transparency endpoints and the witness parse from
//! outside: C2SP signed notes and checkpoints, verifier keys, cosignatures and tile paths.
//! A note that verifies must be exactly the one signed; a mutated note never verifies.
//!
//! CI smoke: proptest's default 256 cases; longer:
//! `PROPTEST_CASES=200000 cargo test -p medvault-audit --release fuzz_`.

use proptest::prelude::*;

use crate::note::{
    checkpoint_text, parse_checkpoint, verify_cosignature, NoteSigner, NoteVerifier, Witness,
};
use crate::tiles::TileRef;

/// The C2SP tlog-tiles path of `t` (the inverse of [`TileRef::parse`]).
fn tile_path(t: TileRef) -> String {
    let (first, index, width) = match t {
        TileRef::Hashes {
            level,
            index,
            width,
        } => (level.to_string(), index, width),
        TileRef::Entries { index, width } => ("entries".to_owned(), index, width),
    };
    let mut groups = vec![];
    let mut n = index;
    loop {
        groups.push(n % 1000);
        n /= 1000;
        if n == 0 {
            break;
        }
    }
    groups.reverse();
    let last = groups.len() - 1;
    let elems: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            if i < last {
                format!("x{g:03}")
            } else {
                format!("{g:03}")
            }
        })
        .collect();
    let mut p = format!("{first}/{}", elems.join("/"));
    if let Some(w) = width {
        p.push_str(&format!(".p/{w}"));
    }
    p
}

fn arb_tile() -> impl Strategy<Value = TileRef> {
    let width = prop::option::of(1u64..=255);
    prop_oneof![
        (0u32..64, any::<u64>(), width.clone()).prop_map(|(level, index, width)| TileRef::Hashes {
            level,
            index,
            width
        }),
        (any::<u64>(), width).prop_map(|(index, width)| TileRef::Entries { index, width }),
    ]
}

proptest! {
    #[test]
    fn fuzz_tile_paths_round_trip(t in arb_tile()) {
        prop_assert_eq!(TileRef::parse(&tile_path(t)), Some(t));
    }

    #[test]
    fn fuzz_tile_paths_never_panic(p in prop_oneof![
        "[0-9a-z./x-]{0,40}",
        any::<String>(),
        "(entries|[0-9]{1,3})(/x[0-9]{3}){0,8}/[0-9]{3}(\\.p/[0-9]{1,4})?",
    ]) {
        if let Some(t) = TileRef::parse(&p) {
            // Only canonical paths are accepted.
            prop_assert_eq!(tile_path(t), p);
        }
    }

    #[test]
    fn fuzz_checkpoints_and_verifier_keys(text in any::<String>(), key in any::<String>()) {
        let _ = parse_checkpoint(&text);
        if let Ok(v) = NoteVerifier::parse(&key) {
            let _ = v.verify(&text);
        }
    }

    #[test]
    fn fuzz_signed_notes_verify_only_unaltered(
        size in any::<u64>(),
        root in any::<[u8; 32]>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let signer = NoteSigner::new("medvault.example/log", &[7u8; 32]);
        let verifier = NoteVerifier::parse(&signer.verifier_key()).unwrap();
        let note = signer.sign(&checkpoint_text("medvault.example/log", size, &root));
        let body = verifier.verify(&note).unwrap();
        prop_assert_eq!(parse_checkpoint(body).unwrap(), ("medvault.example/log".to_owned(), size, root));
        // Any single-byte change is refused (or, if it makes the text invalid UTF-8 or
        // leaves the signed text unchanged, never accepted as a different checkpoint).
        let mut bytes = note.clone().into_bytes();
        let i = at.index(bytes.len());
        if bytes[i] != byte {
            bytes[i] = byte;
            if let Ok(mutated) = String::from_utf8(bytes) {
                if let Ok(b) = verifier.verify(&mutated) {
                    prop_assert_eq!(parse_checkpoint(b).ok(), Some(("medvault.example/log".to_owned(), size, root)));
                }
            }
        }
    }

    #[test]
    fn fuzz_cosignatures(note in any::<String>(), ts in any::<u64>()) {
        let w = Witness::new("witness.example", &[3u8; 32]);
        let _ = verify_cosignature(&note, &w.verifier_key());
        let cosigned = format!("{}{}", note, w.cosign(&note, ts));
        let _ = verify_cosignature(&cosigned, &w.verifier_key());
        let _ = verify_cosignature(&cosigned, &note);
    }
}
