using System.CommandLine;
using System.Globalization;
using System.Numerics;
using System.Text;
using Vmsnap.Qcow2;

namespace Vmsnap.Cli.Commands;

/// <summary>
/// <c>vmsnap snapshot list|create|delete|apply</c>: a qcow2 image's internal snapshots, listed the
/// way <c>qemu-img snapshot -l</c> (QEMU 7.2) lists them. Exit codes: 0 success, 1 failure (one
/// line on stderr, e.g. a snapshot not found or an image a running QEMU holds), 2 usage error.
/// </summary>
internal static class SnapshotCommands
{
    internal static IEnumerable<CommandFactory> Build() => [new("snapshot", SnapshotCommand)];

    private static Command SnapshotCommand()
    {
        var command = new Command("snapshot", "List, create, delete or apply (revert to) internal snapshots of a qcow2 image");
        command.Subcommands.Add(ListCommand());
        command.Subcommands.Add(CreateCommand());
        command.Subcommands.Add(DeleteCommand());
        command.Subcommands.Add(ApplyCommand());
        return command;
    }

    internal static Option<bool> ForceShareOption() =>
        new("--force-share", "-U") { Description = "Open the image even if another process (a running QEMU) is writing it; what is read may be inconsistent" };

    private static Command ListCommand()
    {
        var image = new Argument<string?>("IMAGE") { Description = "The qcow2 image (or --domain)", Arity = ArgumentArity.ZeroOrOne };
        var forceShare = ForceShareOption();
        var domain = new Option<string?>("--domain") { Description = "A libvirt domain: libvirt's snapshots beside its disks', disagreements flagged" };
        var connect = new Option<string?>("--connect", "-c") { Description = "libvirt's URI with --domain; default as virsh's" };
        var json = Cli.JsonOption();
        var command = new Command("list", "List the snapshots (columns as qemu-img snapshot -l: ID, TAG, VM SIZE, DATE, VM CLOCK, ICOUNT)") { image, forceShare, domain, connect, json };
        command.SetHandler((parse, ct) =>
        {
            if (parse.GetValue(domain) is { } name)
                return parse.GetValue(image) is null
                    ? DomainList.Print(name, parse.GetValue(connect), parse.GetValue(json))
                    : throw new OperationRefusedException("give an IMAGE or --domain NAME, not both");
            string path = parse.GetValue(image) ?? throw new OperationRefusedException("say which image (IMAGE) or which libvirt domain (--domain NAME)");
            using Qcow2Image img = Qcow2Image.Open(path, new Qcow2OpenOptions { ReadOnly = true, ForceShare = parse.GetValue(forceShare), OpenBackingFile = false });
            IReadOnlyList<Qcow2Snapshot> snapshots = img.Snapshots;
            if (parse.GetValue(json))
                Cli.WriteJson(new ListJson(path, snapshots.Select(QemuImgJson.Snapshot).ToArray()), CliJson.Default.ListJson);
            else
                Console.Out.Write(FormatList(snapshots));
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command CreateCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var tag = new Argument<string>("TAG") { Description = "Name of the new snapshot (unique in the image)" };
        var json = Cli.JsonOption();
        var command = new Command("create", "Create a disk-only snapshot of the image's current disk (like qemu-img snapshot -c)") { image, tag, json };
        command.SetHandler((parse, ct) =>
        {
            using Qcow2Image img = Qcow2Image.Open(parse.GetValue(image)!, new Qcow2OpenOptions { OpenBackingFile = true });
            Qcow2Snapshot s = img.CreateSnapshot(parse.GetValue(tag)!, new Qcow2SnapshotCreateOptions { Icount = 0 });
            Report(parse.GetValue(json), "created", img.Path, s);
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command DeleteCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var tag = new Argument<string>("TAG") { Description = "ID or name of the snapshot (an ID is looked up first, as QEMU does)" };
        var json = Cli.JsonOption();
        var command = new Command("delete", "Delete a snapshot and free what only it used, VM state included (like qemu-img snapshot -d)") { image, tag, json };
        command.SetHandler((parse, ct) =>
        {
            using Qcow2Image img = Qcow2Image.Open(parse.GetValue(image)!);
            Qcow2Snapshot s = img.DeleteSnapshot(parse.GetValue(tag)!);
            Report(parse.GetValue(json), "deleted", img.Path, s);
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command ApplyCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var tag = new Argument<string>("TAG") { Description = "ID or name of the snapshot (an ID is looked up first, as QEMU does)" };
        var json = Cli.JsonOption();
        var command = new Command("apply", "Revert the image's disk to a snapshot; the snapshot stays (like qemu-img snapshot -a)") { image, tag, json };
        command.SetHandler((parse, ct) =>
        {
            using Qcow2Image img = Qcow2Image.Open(parse.GetValue(image)!);
            Qcow2Snapshot s = img.ApplySnapshot(parse.GetValue(tag)!);
            Report(parse.GetValue(json), "applied", img.Path, s);
            return Cli.ExitOk;
        });
        return command;
    }

    private static void Report(bool json, string what, string image, Qcow2Snapshot s)
    {
        if (json) Cli.WriteJson(new ActionJson(image, what, QemuImgJson.Snapshot(s)), CliJson.Default.ActionJson);
        else Console.Out.WriteLine($"{what} snapshot {s.Id} '{s.Name}' of '{image}'");
    }

    // ---- qemu-img snapshot -l formatting (QEMU 7.2, block/qapi.c bdrv_snapshot_dump) ----------

    /// <summary>The whole listing: nothing without snapshots, else "Snapshot list:", the header and one row each.</summary>
    internal static string FormatList(IReadOnlyList<Qcow2Snapshot> snapshots)
    {
        if (snapshots.Count == 0) return "";
        var sb = new StringBuilder();
        sb.Append("Snapshot list:\n");
        sb.Append(Left("ID", 10)).Append(Left("TAG", 17)).Append(Right("VM SIZE", 8)).Append(Right("DATE", 20))
          .Append(Right("VM CLOCK", 13)).Append(Right("ICOUNT", 11)).Append('\n');
        foreach (Qcow2Snapshot s in snapshots) sb.Append(FormatRow(s)).Append('\n');
        return sb.ToString();
    }

    /// <summary>One row: ID, TAG (QEMU keeps 127 and 255 bytes of them), VM SIZE, local DATE, VM CLOCK, ICOUNT (blank without icount).</summary>
    internal static string FormatRow(Qcow2Snapshot s)
    {
        string icount = s.Icount == -1 ? "" : s.Icount.ToString(CultureInfo.InvariantCulture);
        return Left(Truncate(s.Id, 127), 9) + " " + Left(Truncate(s.Name, 255), 16) + " " + Right(FormatVmSize((ulong)s.VmStateSize), 8)
            + Right(FormatDate(s.Date), 20) + Right(FormatClock(unchecked((ulong)s.VmClock)), 13) + Right(icount, 11);
    }

    /// <summary>The date's whole seconds in local time, "%Y-%m-%d %H:%M:%S".</summary>
    internal static string FormatDate(DateTimeOffset date) =>
        DateTimeOffset.FromUnixTimeSeconds(date.ToUnixTimeSeconds()).ToLocalTime().ToString("yyyy-MM-dd HH:mm:ss", CultureInfo.InvariantCulture);

    /// <summary>"%02d:%02d:%02d.%03d" of hours, minutes, seconds and milliseconds of the guest clock.</summary>
    internal static string FormatClock(ulong nanoseconds)
    {
        long secs = unchecked((long)(nanoseconds / 1_000_000_000));
        return PadInt(unchecked((int)(secs / 3600)), 2) + ":" + PadInt(unchecked((int)(secs / 60 % 60)), 2) + ":"
            + PadInt(unchecked((int)(secs % 60)), 2) + "." + PadInt(unchecked((int)(nanoseconds / 1_000_000 % 1000)), 3);
    }

    /// <summary>QEMU's size_to_str: binary units, switching up at 1000 of a unit, "%0.3g".</summary>
    internal static string FormatVmSize(ulong value)
    {
        string[] suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
        double scaled = value / (1000.0 / 1024.0);
        int exponent = scaled == 0 ? 0 : Math.ILogB(scaled) + 1;   // frexp's exponent
        int i = (exponent - 1) / 10;                                  // C division truncates toward zero
        ulong div = 1UL << (i * 10);
        return $"{FormatG((double)value / div, 3)} {suffixes[i]}B";
    }

    /// <summary>printf's "%.<paramref name="precision"/>g" for a positive finite value, rounded exactly (ties to even, as glibc does).</summary>
    internal static string FormatG(double value, int precision)
    {
        if (value == 0) return "0";
        long bits = BitConverter.DoubleToInt64Bits(value);
        int biased = (int)((bits >> 52) & 0x7ff);
        long fraction = bits & 0xf_ffff_ffff_ffffL;
        BigInteger num = biased == 0 ? fraction : fraction | (1L << 52);
        int e2 = biased == 0 ? -1074 : biased - 1075;
        BigInteger den = BigInteger.One;
        if (e2 > 0) num <<= e2;
        else den <<= -e2;
        // Decimal exponent X with 10^X <= value < 10^(X+1).
        int x = (int)Math.Floor(Math.Log10(value));
        while (Compare(num, den, x) < 0) x--;
        while (Compare(num, den, x + 1) >= 0) x++;
        // N = value / 10^(X - precision + 1), rounded half to even.
        int shift = precision - 1 - x;
        BigInteger n = shift >= 0 ? num * BigInteger.Pow(10, shift) : num;
        BigInteger d = shift >= 0 ? den : den * BigInteger.Pow(10, -shift);
        BigInteger q = BigInteger.DivRem(n, d, out BigInteger r);
        int c = (r * 2).CompareTo(d);
        if (c > 0 || (c == 0 && !q.IsEven)) q++;
        if (q == BigInteger.Pow(10, precision))
        {
            q /= 10;
            x++;
        }
        string digits = q.ToString(CultureInfo.InvariantCulture);
        if (x < -4 || x >= precision)
        {
            string mantissa = digits.Length > 1 ? (digits[0] + "." + digits[1..]).TrimEnd('0').TrimEnd('.') : digits;
            return $"{mantissa}e{(x < 0 ? '-' : '+')}{Math.Abs(x):00}";
        }
        string integer, fractional;
        if (x >= 0)
        {
            integer = digits[..(x + 1)];
            fractional = digits[(x + 1)..];
        }
        else
        {
            integer = "0";
            fractional = new string('0', -x - 1) + digits;
        }
        fractional = fractional.TrimEnd('0');
        return fractional.Length == 0 ? integer : integer + "." + fractional;
    }

    private static int Compare(BigInteger num, BigInteger den, int exponent) =>
        exponent >= 0 ? num.CompareTo(den * BigInteger.Pow(10, exponent)) : (num * BigInteger.Pow(10, -exponent)).CompareTo(den);

    private static string PadInt(int value, int width)
    {
        string digits = Math.Abs((long)value).ToString(CultureInfo.InvariantCulture);
        string sign = value < 0 ? "-" : "";
        int zeros = width - sign.Length - digits.Length;
        return sign + (zeros > 0 ? new string('0', zeros) : "") + digits;
    }

    // printf pads by bytes, not characters: a UTF-8 name takes its byte count.
    private static string Left(string s, int width) => s + new string(' ', Math.Max(0, width - Encoding.UTF8.GetByteCount(s)));

    private static string Right(string s, int width) => new string(' ', Math.Max(0, width - Encoding.UTF8.GetByteCount(s))) + s;

    private static string Truncate(string s, int bytes)
    {
        byte[] b = Encoding.UTF8.GetBytes(s);
        return b.Length <= bytes ? s : Encoding.UTF8.GetString(b, 0, bytes);
    }

    /// <summary>
    /// JSON of <c>snapshot list --json</c>: qemu-img has none, so the shape of <c>qemu-img info
    /// --output=json</c>'s filename and snapshots (here present even when empty).
    /// </summary>
    internal sealed record ListJson(string Filename, IReadOnlyList<QemuImgJson.SnapshotInfo> Snapshots);

    /// <summary>JSON of <c>snapshot create|delete|apply --json</c>.</summary>
    internal sealed record ActionJson(string Filename, string Action, QemuImgJson.SnapshotInfo Snapshot);
}
