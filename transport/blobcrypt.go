package transport

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
)

// swtpm encrypts state blobs with AES-CBC under a 128- or 256-bit key: a
// random IV in a TLV as long as the key (only its first 16 bytes are the
// IV), plaintext padded PKCS#7-style to a multiple of the key length, and
// HMAC-SHA256 with the same key over the ciphertext and the IV TLV's value,
// checked before decrypting.
const (
	tagEncryptedData       = 2
	tagHMAC                = 3
	tagEncryptedMigration  = 5
	tagIVEncryptedData     = 6
	tagIVEncryptedMigation = 7

	blobFlagState256     = 0x08
	blobFlagMigration256 = 0x10

	// ResultDecryptError: a blob's HMAC does not match.
	ResultDecryptError Result = 0x21
	// ResultBadKeyProperty: a blob was encrypted with a key of another length.
	ResultBadKeyProperty Result = 0x28
)

// encryptTLVs encrypts plain under key into TLV(ctTag) TLV(HMAC) TLV(ivTag).
func encryptTLVs(key, plain []byte, ctTag, ivTag uint16) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("state blob key: %w", err)
	}
	iv := make([]byte, len(key))
	if _, err := rand.Read(iv); err != nil {
		return nil, err
	}
	pad := len(key) - len(plain)%len(key)
	ct := append(append([]byte(nil), plain...), bytes.Repeat([]byte{byte(pad)}, pad)...)
	cipher.NewCBCEncrypter(block, iv[:aes.BlockSize]).CryptBlocks(ct, ct)
	mac := hmac.New(sha256.New, key)
	mac.Write(ct)
	mac.Write(iv)
	out := appendTLV(nil, ctTag, ct)
	out = appendTLV(out, tagHMAC, mac.Sum(nil))
	return appendTLV(out, ivTag, iv), nil
}

// decryptTLVs opens what encryptTLVs made.
func decryptTLVs(key, body []byte, ctTag, ivTag uint16) ([]byte, error) {
	ct, err := findTLV(body, ctTag)
	if err != nil {
		return nil, err
	}
	sum, err := findTLV(body, tagHMAC)
	if err != nil {
		return nil, err
	}
	iv, err := findTLV(body, ivTag)
	if err != nil {
		return nil, err
	}
	mac := hmac.New(sha256.New, key)
	mac.Write(ct)
	mac.Write(iv)
	if !hmac.Equal(mac.Sum(nil), sum) {
		return nil, fmt.Errorf("state blob HMAC does not match (wrong key or altered blob): %w", ResultDecryptError)
	}
	if len(iv) < aes.BlockSize || len(ct) == 0 || len(ct)%len(key) != 0 {
		return nil, fmt.Errorf("encrypted state blob of %d bytes with a %d-byte IV: %w", len(ct), len(iv), ResultBadDataSize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("state blob key: %w", err)
	}
	plain := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv[:aes.BlockSize]).CryptBlocks(plain, ct)
	pad := int(plain[len(plain)-1])
	if pad == 0 || pad > len(key) || !bytes.Equal(plain[len(plain)-pad:], bytes.Repeat([]byte{byte(pad)}, pad)) {
		return nil, fmt.Errorf("encrypted state blob has bad padding: %w", ResultBadDataSize)
	}
	return plain[:len(plain)-pad], nil
}

// checkKeyLength compares a blob's 256-bit flag with the key's length.
func checkKeyLength(key []byte, flags uint16, flag256 uint16) error {
	if (len(key) == 32) != (flags&flag256 != 0) {
		return fmt.Errorf("state blob encrypted with a key of another length than %d bits: %w", 8*len(key), ResultBadKeyProperty)
	}
	return nil
}
