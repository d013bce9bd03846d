package provision

import "github.com/google/go-tpm/tpm2"

// policyBSHA384 is the EK Credential Profile's PolicyB for SHA-384
// (PolicyOR of PolicySecret(TPM_RH_ENDORSEMENT) and PolicyAuthorizeNV), the
// authPolicy of the high range EK templates with that name algorithm.
var policyBSHA384 = []byte{
	0xb2, 0x6e, 0x7d, 0x28, 0xd1, 0x1a, 0x50, 0xbc, 0x53, 0xd8, 0x82, 0xbc,
	0xf5, 0xfd, 0x3a, 0x1a, 0x07, 0x41, 0x48, 0xbb, 0x35, 0xd3, 0xb4, 0xe4,
	0xcb, 0x1c, 0x0a, 0xd9, 0xbd, 0xe4, 0x19, 0xca, 0xcb, 0x47, 0xba, 0x09,
	0x69, 0x96, 0x46, 0x15, 0x0f, 0x9f, 0xc0, 0x00, 0xf3, 0xf8, 0x0e, 0x12,
}

// eccP384 is the parameters of an ECC NIST P-384 storage key (restricted
// decryption) with AES-256 CFB, no scheme and no KDF.
var eccP384 = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
	Symmetric: tpm2.TPMTSymDefObject{
		Algorithm: tpm2.TPMAlgAES,
		KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
		Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
	},
	Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
	CurveID: tpm2.TPMECCNistP384,
	KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
})

// ECCP384EKTemplate is the EK Credential Profile's template H-3 (ECC NIST
// P-384, high range): the EK swtpm_setup creates (without
// --allow-signing), so that it derives the same key from the same seed.
var ECCP384EKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA384,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		AdminWithPolicy:     true,
		Restricted:          true,
		Decrypt:             true,
	},
	AuthPolicy: tpm2.TPM2BDigest{Buffer: policyBSHA384},
	Parameters: eccP384,
	Unique:     tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// eccP384SPKTemplate is the ECC storage primary key swtpm_setup --create-spk
// --ecc makes: NIST P-384, SHA-384 names, the TCG SRK attributes (no
// dictionary-attack protection, empty authorization) and a unique field of
// zeros.
var eccP384SPKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA384,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		Restricted:          true,
		Decrypt:             true,
	},
	Parameters: eccP384,
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 48)},
		Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 48)},
	}),
}
