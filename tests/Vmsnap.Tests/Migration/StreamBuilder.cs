using System.Buffers.Binary;
using System.Text;

namespace Vmsnap.Tests.Migration;

/// <summary>
/// Builds migration-stream bytes by hand from the format facts (DESIGN.md, QEMU's savevm.c/ram.c), so
/// tests compare the code under test with an independent expectation.
/// </summary>
internal sealed class StreamBuilder
{
    public const ulong Page = 0x08, Zero = 0x02, Continue = 0x20, MemSize = 0x04, Eos = 0x10;

    private readonly List<byte> _bytes = new();

    public int Length => _bytes.Count;

    public byte[] ToArray() => _bytes.ToArray();

    public StreamBuilder U8(byte value)
    {
        _bytes.Add(value);
        return this;
    }

    public StreamBuilder Be16(ushort value) => Raw([(byte)(value >> 8), (byte)value]);

    public StreamBuilder Be32(uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        return Raw(b);
    }

    public StreamBuilder Be64(ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        return Raw(b);
    }

    public StreamBuilder Raw(ReadOnlySpan<byte> bytes)
    {
        foreach (byte b in bytes) _bytes.Add(b);
        return this;
    }

    /// <summary>u8 length + bytes (section and RAM block id strings).</summary>
    public StreamBuilder Id(string id) => U8((byte)id.Length).Raw(Encoding.ASCII.GetBytes(id));

    public StreamBuilder Header() => Be32(0x5145564d).Be32(3);

    public StreamBuilder Configuration(string machine) => U8(0x07).Be32((uint)machine.Length).Raw(Encoding.ASCII.GetBytes(machine));

    public StreamBuilder Start(uint id, string name = "ram", uint instance = 0, uint version = 4) =>
        U8(0x01).Be32(id).Id(name).Be32(instance).Be32(version);

    public StreamBuilder Full(uint id, string name, uint instance, uint version) => U8(0x04).Be32(id).Id(name).Be32(instance).Be32(version);

    public StreamBuilder Part(uint id) => U8(0x02).Be32(id);

    public StreamBuilder End(uint id) => U8(0x03).Be32(id);

    public StreamBuilder Footer(uint id) => U8(0x7e).Be32(id);

    public StreamBuilder EndOfRecords() => Be64(Eos);

    /// <summary>MEM_SIZE with the block list.</summary>
    public StreamBuilder BlockList(params (string Id, long Length)[] blocks)
    {
        Be64((ulong)blocks.Sum(b => b.Length) | MemSize);
        foreach (var (id, length) in blocks) Id(id).Be64((ulong)length);
        return this;
    }

    /// <summary>A PAGE record: named when <paramref name="block"/> is given, else CONTINUE.</summary>
    public StreamBuilder PageRecord(long offset, byte[] data, string? block = null)
    {
        Be64((ulong)offset | Page | (block is null ? Continue : 0));
        if (block is not null) Id(block);
        return Raw(data);
    }

    /// <summary>A ZERO record with its fill byte.</summary>
    public StreamBuilder ZeroRecord(long offset, string? block = null, byte fill = 0)
    {
        Be64((ulong)offset | Zero | (block is null ? Continue : 0));
        if (block is not null) Id(block);
        return U8(fill);
    }

    /// <summary>EOF, then the VM description.</summary>
    public StreamBuilder Tail(string json = "{\"page_size\": 4096, \"devices\": []}")
    {
        byte[] b = Encoding.UTF8.GetBytes(json);
        return U8(0x00).U8(0x06).Be32((uint)b.Length).Raw(b);
    }

    public static byte[] PageOf(byte value)
    {
        byte[] p = new byte[4096];
        p.AsSpan().Fill(value);
        return p;
    }

    public static byte[] RandomPage(Random random)
    {
        byte[] p = new byte[4096];
        random.NextBytes(p);
        p[0] |= 1;
        return p;
    }
}
