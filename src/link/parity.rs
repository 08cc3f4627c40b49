//! Software parity for 7-bit lines (7E1, 7O1) on devices that cannot do it themselves: pseudo-terminals force 8N1,
//! and some USB adapters ignore the parity setting. The port runs 8N1 and the eighth bit is computed on send and
//! checked and stripped on receive.

use serde::Deserialize;

/// Parity of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// A byte that cannot go on a 7-bit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("byte {offset} is 0x{byte:02X}, which does not fit 7 data bits")]
pub struct EightBitByte {
    pub offset: usize,
    pub byte: u8,
}

fn with_parity(b: u8, parity: Parity) -> u8 {
    let ones = (b & 0x7F).count_ones();
    let high = match parity {
        Parity::Even => ones % 2 == 1,
        Parity::Odd => ones % 2 == 0,
        Parity::None => false,
    };
    (b & 0x7F) | if high { 0x80 } else { 0 }
}

/// Sets the eighth bit of each byte (7 data bits with `parity`) in place. Bytes with the eighth bit already set
/// cannot be sent on such a line.
pub fn add(bytes: &mut [u8], parity: Parity) -> Result<(), EightBitByte> {
    if parity == Parity::None {
        return Ok(());
    }
    for (offset, b) in bytes.iter_mut().enumerate() {
        if *b > 0x7F {
            return Err(EightBitByte { offset, byte: *b });
        }
        *b = with_parity(*b, parity);
    }
    Ok(())
}

/// Checks and clears the eighth bit of each byte in place; returns the offsets of bytes whose parity was wrong.
pub fn strip(bytes: &mut [u8], parity: Parity) -> Vec<usize> {
    let mut bad = Vec::new();
    if parity == Parity::None {
        return bad;
    }
    for (offset, b) in bytes.iter_mut().enumerate() {
        if with_parity(*b, parity) != *b {
            bad.push(offset);
        }
        *b &= 0x7F;
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_and_odd_parity_bits() {
        // 'A' = 0x41 has two ones: even parity leaves bit 7 clear, odd sets it. 'C' = 0x43 has three.
        let mut b = *b"AC";
        add(&mut b, Parity::Even).unwrap();
        assert_eq!(b, [0x41, 0xC3]);
        let mut b = *b"AC";
        add(&mut b, Parity::Odd).unwrap();
        assert_eq!(b, [0xC1, 0x43]);
    }

    #[test]
    fn strip_undoes_add_and_finds_flipped_bits() {
        for parity in [Parity::Even, Parity::Odd] {
            let original: Vec<u8> = (0u8..128).collect();
            let mut b = original.clone();
            add(&mut b, parity).unwrap();
            let mut s = b.clone();
            assert!(strip(&mut s, parity).is_empty());
            assert_eq!(s, original);
            b[5] ^= 0x80;
            b[77] ^= 0x01;
            assert_eq!(strip(&mut b, parity), [5, 77]);
        }
    }

    #[test]
    fn eight_bit_data_is_refused_on_a_seven_bit_line() {
        let mut b = [0x30, 0x9F];
        assert_eq!(add(&mut b, Parity::Even), Err(EightBitByte { offset: 1, byte: 0x9F }));
        let mut b = [0xFF];
        assert!(add(&mut b, Parity::None).is_ok());
        assert!(strip(&mut b, Parity::None).is_empty());
        assert_eq!(b, [0xFF]);
    }
}
